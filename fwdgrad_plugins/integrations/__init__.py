"""Integrations with training frameworks, installed as ``fwdgrad_plugins.integrations``.

Each is registered through the ``register_integrations`` hook like a third-party plugin and
imported only when used, so ``import fwdgrad_plugins`` never imports transformers.
"""

from fwdgrad_plugins.hookspecs import hookimpl


@hookimpl
def register_integrations(register):
    register("torch-optimizer", "fwdgrad_plugins.integrations.torch_optim:ForwardGradient")
    register("accelerate", "fwdgrad_plugins.integrations.accelerate_loop:train")
    register("transformers", "fwdgrad_plugins.integrations.transformers_trainer:FwdGradTrainer")
