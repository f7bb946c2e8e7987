"""collection: find similar images and query what is in them."""

__version__ = "0.1.0"
