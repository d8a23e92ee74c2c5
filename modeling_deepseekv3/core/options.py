"""Allowed values of the plugin's knobs, defined once. No imports: the CLI builds its parser from these at
start-up without loading torch (``deepseek-v3 --help`` stays fast); the configuration validates against them."""

MLA_IMPLEMENTATIONS = ("auto", "absorb", "expand")
LATENT_CACHE_FORMATS = ("dtype", "fp8", "fp8_plain")
