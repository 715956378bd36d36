"""The labeling page's walk through a queue (plain Python, no Streamlit)."""

from app.trail import Trail


def test_a_finished_queue_shows_crops_added_later():
    queue = [(1, 101)]  # (cursor, image id), keyset by id

    def fetch(cursor):
        return [row for row in queue if row[0] > cursor][:1]

    trail = Trail(queue="mine")
    assert trail.current(fetch) == 101
    trail.forward()
    assert trail.current(fetch) is None and trail.exhausted
    queue.append((2, 102))  # e.g. cropped in the Slide workspace meanwhile
    assert trail.current(fetch) == 102 and not trail.exhausted
