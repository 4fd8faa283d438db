"""The one training loop every training pass shares."""
