"""Tandem: disaggregated inference for DeepSeek-V3-architecture Mixture-of-Experts models."""

__version__ = "0.1.0"
