"""World-model evaluation of a trained checkpoint on held-out episodes (`lbva eval`): imagined
video against copy-last-frame, inverse dynamics against the mean action, the flow-matching loss
against the Gaussian prior, and pictures. Sits above training (data, split, objective) and
inference (the sampler), below the launchers' root command."""
