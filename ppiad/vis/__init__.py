"""Pictures for people: an image with the model's verdict and reasoning beside it."""
from ppiad.vis.draw import render_verdict, save_verdict

__all__ = ["render_verdict", "save_verdict"]
