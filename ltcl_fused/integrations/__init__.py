"""Drop-in replacements for other libraries' losses, computed by ltcl_fused's fused engine.

``ltcl_fused.integrations.pml.SupConLoss``: pytorch-metric-learning's ``losses.SupConLoss``.
"""
