"""MNIST digit prediction service."""
