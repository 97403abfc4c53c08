"""Client side: model + LoRA, the shared train and eval loops, scoring, the ClientApp."""
