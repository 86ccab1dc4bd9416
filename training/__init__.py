"""Offline tooling on diffusers / transformers / open_clip: model building and loading, the demo."""
