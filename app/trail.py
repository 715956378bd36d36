"""Where an annotator is in a queue: the crops shown so far, which one is current, and the
queue's cursor. Plain Python (no Streamlit), kept in ``st.session_state`` by the labeling page.

Labeling or skipping moves forward; "previous" moves back through what was shown, and past the
start of this browser session into the annotator's stored history, so the last labels stay
editable after a reload.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

# fetch(cursor) -> [(cursor, image_id), ...] after ``cursor``; [] when the queue is done.
Fetch = Callable[[object], Sequence[tuple[object, int]]]
# older(exclude) -> image ids labeled before, newest first, none of ``exclude``.
Older = Callable[[Sequence[int]], Sequence[int]]


@dataclass
class Trail:
    queue: Hashable  # what queue this trail walks; a different queue starts a new trail
    ids: list[int] = field(default_factory=list)
    pos: int = 0
    cursor: object = 0  # an image id, or (margin, image id) in the model-uncertain queue
    exhausted: bool = False

    def current(self, fetch: Fetch) -> int | None:
        """The image to show, fetching from the queue when past the end; None when done.

        A finished queue is asked again on every call (one indexed query from the cursor): crops
        added meanwhile — cropped in the Slide workspace, imported, another clinician's skip — show up
        without a restart.
        """
        while self.pos >= len(self.ids):
            batch = list(fetch(self.cursor))
            if not batch:
                self.exhausted = True
                return None
            self.exhausted = False
            for cursor, image_id in batch:
                self.cursor = cursor
                if image_id not in self.ids[self.pos :]:
                    self.ids.append(image_id)
        return self.ids[self.pos]

    def peek(self) -> int | None:
        return self.ids[self.pos] if self.pos < len(self.ids) else None

    def forward(self) -> None:
        self.pos = min(self.pos + 1, len(self.ids))

    def back(self, older: Older) -> bool:
        """Step to the previous crop; False when there is none."""
        if self.pos > 0:
            self.pos -= 1
            return True
        earlier = list(older(self.ids))
        if not earlier:
            return False
        self.ids[0:0] = list(reversed(earlier))
        self.pos = len(earlier) - 1
        return True

    def drop_current(self) -> None:
        """Forget the current crop (its file vanished); the next one becomes current."""
        if self.pos < len(self.ids):
            del self.ids[self.pos]

    def restart(self) -> None:
        """Walk the queue again from its start (e.g. to revisit skipped crops)."""
        self.pos, self.cursor, self.exhausted = len(self.ids), 0, False

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.ids) - 1
