"""Hook specifications: the three kinds of extension fwdgrad-plugins accepts.

A plugin is any object or module with functions marked ``@hookimpl``. Each hook receives a
``register`` callback; the plugin calls it once per thing it provides::

    from fwdgrad_plugins import hookimpl

    @hookimpl
    def register_tangent_samplers(register):
        register("sparse-gaussian", SparseGaussian)

Plugins installed as packages advertise themselves under the entry-point group
``fwdgrad_plugins`` (``[project.entry-points.fwdgrad_plugins] my_plugin = "my_pkg.plugin"``).
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("fwdgrad_plugins")
hookimpl = HookimplMarker("fwdgrad_plugins")


@hookspec
def register_tangent_samplers(register):
    """Register tangent samplers: ``register(name, factory)``.

    ``factory()`` returns a :class:`fwdgrad_plugins.tangents.tangent.TangentSampler`, whose
    ``sample(params, num_directions, seed)`` draws the K tangents for each parameter (and
    may accept ``workspace=``, memory to draw into: see the protocol).
    """


@hookspec
def register_estimators(register):
    """Register gradient estimators: ``register(name, factory)``.

    ``factory(**options)`` returns an object with ``estimate(closure, params, *, sampler,
    num_directions, seed, reduce)`` returning a :class:`fwdgrad_plugins.estimators.core.Estimate`.
    An estimator whose estimate is (1/K) Σ_k d_k v_k may also offer ``tangents(sampler, params,
    num_directions, seed)`` (a :class:`fwdgrad_plugins.tangents.streaming.TangentStream`) and
    ``derivatives(closure, params, tangents)``: ``ForwardSGD`` then applies it without ``.grad``.
    """


@hookspec
def register_integrations(register):
    """Register framework integrations: ``register(name, import_path)``.

    ``import_path`` is ``"module:attribute"``; it is imported only when asked for, so listing
    integrations never imports the framework behind them.
    """
