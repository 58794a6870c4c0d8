"""Contracts shared by the API and the model service: queue messages, Redis keys, the registry."""
