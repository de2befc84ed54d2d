"""Finding the direction: ``collect`` runs the prompts through the model, ``accumulate`` turns the
captured batches into the measurements (residual means, router statistics, harmless moments, the
file's meta; the interop adapters use it too), ``analyze`` reads them and recommends layers and a config."""


def __getattr__(name: str):
    if name == "measure":  # lazy: importing the package does not import torch's model code
        from .collect import measure

        return measure
    raise AttributeError(f"module 'intervene.measure' has no attribute '{name}'")


__all__ = ["measure"]
