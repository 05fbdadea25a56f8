"""Lightning layer: LightningModules, LightningDataModules and transforms for training and evaluating ViTs."""
