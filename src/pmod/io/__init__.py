"""Getting models and inputs in: model folders, processors and prompts, importers of other checkpoint formats."""
