"""Model ports that diffusers does not ship, written as diffusers `ModelMixin`s so the caching core
attaches to them exactly as it does to diffusers' own transformers."""
