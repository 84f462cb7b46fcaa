"""StreamGuard: live deepfake and impostor-face detection for video calls and camera streams."""

__version__ = "0.1.0"
