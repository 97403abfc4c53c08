"""fedbilevel: FedBip personalized federated fine-tuning of foundation models, as a Flower app."""
