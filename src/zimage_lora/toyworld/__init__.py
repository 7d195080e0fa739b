"""The toy world: a tiny pretrained Z-Image family (base, Turbo, training adapter, De-Turbo) that really draws."""
