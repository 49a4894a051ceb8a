"""The record side of runlens. Everything under this package may import torch."""
