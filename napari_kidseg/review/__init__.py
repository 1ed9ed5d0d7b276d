"""The review wing: the review model, the corrections folder, the worklist, the display arithmetic (no Qt)."""
