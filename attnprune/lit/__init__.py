"""Lightning layer: LightningModules and their backbone config, LightningDataModules, callbacks and the CLI."""
