"""Exports of a run into formats other tools read: SAELens cached activations, legacy pickles."""
