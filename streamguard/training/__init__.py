"""Training StreamGuard's own face classifier: self-blended images, augmentations, data, model, export.

`sbi`, `augment` and `evaluation` need only numpy/cv2 (and the serving stack); `data`, `model`, `trainer` and
`export` need torch (`pip install -e .[train]`). Nothing here is imported by the serving path.
"""
