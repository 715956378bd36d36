"""Glomerulus detection: a U-Net segmenter at a fixed working resolution, run tile by tile over slides.

``config`` (recipe), ``model`` (build, checkpoint), ``data`` (real tiles and crops, augmentation),
``train`` (``glom train-detector``), ``instances`` (probability map → glomeruli), ``slides``
(``glom detect``: tissue mask, tiling, stitching, GeoJSON), ``scoring`` (``glom evaluate-detector``).
"""
