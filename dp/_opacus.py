"""Sample-level DP-SGD on a client, with Opacus kept behind this one adapter.

The user passes their own module, optimizer and data loader; ``SampleLevelDP.attach``
returns a ``PrivateTraining`` whose ``step(per_sample_loss)`` runs backward, per-sample
clipping, noise and the optimizer step in any clipping mode, and whose ``detach()`` hands
back the very module that was passed in, with a clean ``state_dict`` (no ``_module.``
prefix: the module is never wrapped) and no ``grad_sample`` or other Opacus state left on
its parameters (meta-pytorch/opacus #341, #435).

Clipping modes:
- ``"default"``: Opacus hooks (dense per-sample gradients) and ``DPOptimizer``.
- ``"ghost"``: Opacus fast gradient / ghost clipping (two backward passes).
- ``"embedding"``: ours (``dp._fastclip``): one backward pass, sparse per-sample norms for
  embedding tables; Opacus still provides Poisson sampling, the accountant and (in secure
  mode) the noise generator; the noise, of Opacus's distribution, is written straight into
  ``p.grad``. With ``lazy_noise=True`` (plain SGD only) embedding rows receive their noise
  when next read instead (``dp._lazy``).
- ``"auto"``: ``"embedding"`` when the model has a trainable embedding table and every
  trainable layer is supported by it, else ``"ghost"`` unless parameters are tied, else
  ``"default"``.

Who sees what: everything here runs on the client; what leaves it is the trained module
(or its update), covered by the sample-level guarantee of ``PrivateTraining.event``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Protocol, Sized, cast

import torch
import torch.nn as nn

from . import _checks as chk
from ._accounting import ACCOUNTANTS
from ._calibration import calibrate_for_runs
from ._errors import DPError, DPTypeError, DPValueError, UnsupportedModelError
from ._events import SampleLevelEvent
from ._fastclip import BookKeepingClipper, PackedEmbedding, tied_parameters, unsupported_layers
from ._lazy import LazyTableNoise, check_lazy_optimizer, plain_sgd_params, worth_deferring

__all__ = ["SampleLevelDP", "PrivateTraining", "CLIPPING_MODES", "resolve_clipping", "bert_dp_inputs"]

CLIPPING_MODES = ("auto", "default", "ghost", "embedding")

_OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks", "ft_compute_sample_grad")


def _register_packed_embedding() -> None:
    """Opacus's embedding samplers for :class:`PackedEmbedding` read batch-first; a packed call is refused."""
    from opacus.grad_sample.embedding import compute_embedding_grad_sample, compute_embedding_norm_sample
    from opacus.grad_sample.grad_sample_module import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    def batch_first_only(sampler: Any) -> Any:
        def sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> Any:
            if len(activations) > 1:
                raise UnsupportedModelError(
                    "a packed PackedEmbedding call (with sample) needs clipping='embedding'; "
                    "Opacus's per-sample gradients assume batch-first inputs"
                )
            return sampler(layer, activations, backprops)

        return sample

    GradSampleModule.GRAD_SAMPLERS.setdefault(PackedEmbedding, batch_first_only(compute_embedding_grad_sample))
    GradSampleModuleFastGradientClipping.NORM_SAMPLERS.setdefault(
        PackedEmbedding, batch_first_only(compute_embedding_norm_sample)
    )


def resolve_clipping(module: nn.Module, clipping: str = "auto") -> str:
    """The clipping mode ``attach`` would use for ``module`` (``"auto"`` resolved)."""
    chk.one_of("clipping", clipping, CLIPPING_MODES)
    if clipping != "auto":
        return clipping
    has_table = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.weight.requires_grad for m in module.modules())
    if has_table and not unsupported_layers(module):
        return "embedding"
    return "default" if tied_parameters(module) else "ghost"


def bert_dp_inputs(
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Keyword inputs for a Hugging Face BERT-family model with every index tensor batch-first.

    BERT builds ``position_ids`` of shape ``(1, seq_len)`` from a buffer and broadcasts it;
    per-sample gradients of the position embedding then cannot be told apart, and Opacus
    (and our clipping) need ``position_ids`` and ``token_type_ids`` of shape
    ``(batch, seq_len)`` passed explicitly. Use as ``model(**bert_dp_inputs(ids, attention_mask=m))``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise DPValueError(
            f"input_ids must be a 2-D tensor (batch, seq_len), got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
        )
    batch, length = input_ids.shape
    out = {
        "input_ids": input_ids,
        "position_ids": torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length).contiguous(),
        "token_type_ids": (token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)),
    }
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
    return out


@dataclass(frozen=True, kw_only=True)
class SampleLevelDP:
    """DP-SGD configuration for one client's local training (Abadi et al. CCS 2016).

    Give the noise either directly (``noise_multiplier``) or as a target: ``target_epsilon``
    with ``delta`` leaves the multiplier to :meth:`calibrated`, which whoever knows the
    training schedule calls (``fedcore.Federation`` does, for the client that needs the most
    noise); ``attach`` refuses a configuration whose multiplier is still unknown.

    Attributes:
        noise_multiplier: per-step noise standard deviation over ``max_grad_norm``.
        max_grad_norm: per-sample gradient L2 clip bound.
        target_epsilon: the epsilon, at ``delta``, that every client's whole run must stay within.
        delta: the delta epsilons are stated at (needed with ``target_epsilon``).
        accountant: the accountant calibration uses (``"pld"``, ``"rdp"``...), and so should the
            report and budget that charge the run.
        clipping: ``"auto"``, ``"default"``, ``"ghost"`` or ``"embedding"`` (see module doc).
        poisson_sampling: Poisson-sample batches (what the accountants assume). ``False``
            keeps the loader's own batches; events then say ``sampling="fixed_size"``.
        secure_mode: Opacus's secure noise and sampling (needs ``torchcsprng``). Without it
            noise comes from torch's PRNG: fine for research, not for production.
        lazy_noise: with ``clipping="embedding"`` and plain ``torch.optim.SGD``, give each
            embedding-table row its DP noise only when the row is next read (``dp._lazy``):
            the same distribution as eager DP-SGD at a fraction of the cost for large tables
            (tables under ``dp._lazy.MIN_DEFERRED_COORDINATES`` keep eager noise).
            Rows read directly through ``.weight`` between steps lack pending noise until
            ``flush()`` / ``state_dict()`` / ``event()`` / ``detach()`` (so does a ``deepcopy`` of
            the attached module, and a forward pre-hook registered after attach that changes the
            indices: the rows flushed are those the lookup was called with). Parameters in groups
            that are plain SGD at a step are updated by the DP step itself (no ``p.grad``); the
            optimizer's ``step()`` runs only when some group is not, so its step hooks (and a
            learning-rate scheduler's check that it stepped) see only those steps. A table's group
            that stops being plain SGD after attach (a scheduler cycling momentum) is refused at
            the next step.
        unit: ``"record"``: one example is the unit of privacy (its ledger events say so).
    """

    noise_multiplier: float | None = None
    max_grad_norm: float
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str = "pld"
    clipping: str = "auto"
    poisson_sampling: bool = True
    secure_mode: bool = False
    lazy_noise: bool = False
    unit: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise DPValueError(
                "give exactly one of noise_multiplier (the noise itself) or target_epsilon (with delta, to calibrate it), "
                f"got noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}"
            )
        if self.noise_multiplier is not None:
            object.__setattr__(self, "noise_multiplier", chk.positive("noise_multiplier", self.noise_multiplier))
        if self.target_epsilon is not None:
            object.__setattr__(self, "target_epsilon", chk.positive("target_epsilon", self.target_epsilon))
            if self.delta is None:
                raise DPValueError("target_epsilon needs delta (the delta the epsilon is stated at), got delta=None")
        if self.delta is not None:
            object.__setattr__(self, "delta", chk.open_unit("delta", self.delta))
        chk.one_of("accountant", self.accountant, ACCOUNTANTS)
        object.__setattr__(self, "max_grad_norm", chk.positive("max_grad_norm", self.max_grad_norm))
        chk.one_of("clipping", self.clipping, CLIPPING_MODES)
        for name in ("poisson_sampling", "secure_mode", "lazy_noise"):
            if not isinstance(getattr(self, name), bool):
                raise DPTypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def calibrated(self, runs: Mapping[str, tuple[int, float]]) -> tuple["SampleLevelDP", str]:
        """This configuration with the noise that keeps every run within ``target_epsilon``.

        Args:
            runs: ``{client_id: (total DP-SGD steps, record sampling rate)}``, one per client.

        Returns:
            A copy holding the calibrated ``noise_multiplier`` (``target_epsilon`` cleared),
            and the id of the client whose run needed it (see ``calibrate_for_runs``).

        Raises:
            DPValueError: no target to calibrate to, no runs, or a target no noise can meet.
        """
        if self.target_epsilon is None:
            raise DPValueError(f"calibrated() needs target_epsilon, but noise_multiplier={self.noise_multiplier!r} is fixed")
        assert self.delta is not None  # checked in __post_init__
        z, worst = calibrate_for_runs(target_epsilon=self.target_epsilon, delta=self.delta, runs=runs, accountant=self.accountant)
        return dataclasses.replace(self, noise_multiplier=z, target_epsilon=None), worst

    def attach(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        *,
        generator: torch.Generator | None = None,
    ) -> "DPTraining":
        """Make ``module``'s training differentially private (a :class:`PrivateTraining`).

        Args:
            module: the user's model; batch-first inputs; not wrapped, hooks are added.
            optimizer: an optimizer over (a subset of) ``module``'s parameters.
            data_loader: a map-style loader; its batch size sets the sampling rate
                ``1 / len(data_loader)``, as in Opacus.
            generator: seeds Poisson sampling and noise (reproducible runs); refused in
                secure mode.

        Raises:
            UnsupportedModelError: a layer Opacus refuses (e.g. BatchNorm), or one the chosen
                clipping mode cannot handle.
            DPValueError / DPTypeError: bad arguments, or a ``target_epsilon`` not yet calibrated.
        """
        self.noise()
        return PrivateTraining(self, module, optimizer, data_loader, generator=generator)

    def noise(self) -> float:
        """The noise multiplier, once known.

        Raises:
            DPValueError: a ``target_epsilon`` not yet calibrated.
        """
        if self.noise_multiplier is None:
            raise DPValueError(
                f"target_epsilon={self.target_epsilon!r} is not calibrated yet: call calibrated(runs) with each client's "
                "schedule first (fedcore.Federation does it for you)"
            )
        return self.noise_multiplier


class DPTraining(Protocol):
    """What ``attach`` of every DP level returns (``PrivateTraining``, ``UserLevelTraining``): the run a loop drives."""

    @property
    def module(self) -> nn.Module: ...
    @property
    def data_loader(self) -> Iterable[Any]: ...
    @property
    def steps(self) -> int: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def expected_batch_size(self) -> int: ...
    @property
    def clipping(self) -> str: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...
    def step(self, per_sample_loss: torch.Tensor) -> None: ...
    def flush(self) -> None: ...
    def event(self, *, client_id: str, round_index: int) -> SampleLevelEvent: ...
    def opacus_epsilon(self, *, delta: float) -> float: ...
    def detach(self) -> nn.Module: ...


class PrivateTraining:
    """A module, optimizer and Poisson loader under DP-SGD; made by ``SampleLevelDP.attach``.

    Attributes:
        module: the user's own module (never wrapped).
        optimizer: Opacus's DP optimizer around the user's optimizer ("default", "ghost"),
            or the user's optimizer itself ("embedding": noise is added by ``step``).
        data_loader: the Poisson-sampled loader to iterate over (batches may be empty).
        clipping: the clipping mode in use (``"auto"`` resolved).
        sample_rate: per-step sampling probability of a record.
        expected_batch_size: ``int(len(dataset) * sample_rate)``, the averaging denominator.
        steps: optimizer steps taken so far (empty batches included).
    """

    def __init__(
        self,
        config: SampleLevelDP,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        *,
        generator: torch.Generator | None,
    ) -> None:
        from opacus.validators.errors import UnsupportedModuleError
        from opacus.validators.module_validator import ModuleValidator

        if not isinstance(module, nn.Module):
            raise DPTypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise DPTypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(data_loader, torch.utils.data.DataLoader):
            raise DPTypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DPTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator is not None and config.secure_mode:
            raise DPValueError("generator must be None when secure_mode=True (secure mode seeds itself)")
        if hasattr(module, "autograd_grad_sample_hooks") or getattr(module, "_dp_attached", False):
            raise DPValueError("module is already attached to a PrivateTraining; detach() it first")
        if len(data_loader) == 0:
            raise DPValueError("data_loader must yield at least one batch, got an empty loader")
        params = {id(p) for p in module.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in params:
                    raise DPValueError("optimizer holds parameters that are not module's parameters")
        try:
            ModuleValidator.validate(module, strict=True)
        except UnsupportedModuleError as exc:
            raise UnsupportedModelError(
                f"Opacus refuses this module: {exc}. Replace the layers (e.g. "
                f"opacus.validators.ModuleValidator.fix(module)) before attaching."
            ) from exc

        self.config = config
        self.module = module
        self.clipping = resolve_clipping(module, config.clipping)
        self.noise_multiplier = config.noise()
        self.max_grad_norm = config.max_grad_norm
        self._steps = 0
        self._detached = False
        self._hooks: Any = None
        self._clipper: BookKeepingClipper | None = None
        self._lazy: LazyTableNoise | None = None
        self._deferred: dict[torch.Tensor, nn.Module] = {}  # table weight -> table, noise deferred
        self._state_hooks: list[Any] = []
        self._optimizer_stepped = True  # the last step went through optimizer.step() (its grads to clear)
        self._user_optimizer = optimizer
        self.module._dp_attached = True  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors and modules only
        try:
            self._attach(config, module, optimizer, data_loader, generator)
        except BaseException:
            self.detach()  # a failed attach leaves nothing on the module
            raise

    def _attach(
        self,
        config: SampleLevelDP,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        generator: torch.Generator | None,
    ) -> None:
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self._engine = PrivacyEngine(accountant="rdp", secure_mode=config.secure_mode)
        rng = self._engine.secure_rng if config.secure_mode else generator
        optimizer.zero_grad(set_to_none=True)

        self._rng = rng
        if config.lazy_noise and self.clipping != "embedding":
            raise DPValueError(f"lazy_noise=True needs clipping='embedding' (ours), but clipping resolves to {self.clipping!r}")
        if self.clipping == "embedding":
            # Ours computes the clipped sum; Opacus provides the loader, the accountant and
            # (in secure mode) the noise generator. Noise is written straight into p.grad.
            lazy_groups = None
            if config.lazy_noise:
                in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
                tables = [
                    m
                    for m in module.modules()
                    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.weight.requires_grad and id(m.weight) in in_opt
                ]
                lazy_groups = check_lazy_optimizer(optimizer, tables)
                lazy_groups = {t: g for t, g in lazy_groups.items() if worth_deferring(t)}
            self._clipper = BookKeepingClipper(module, max_grad_norm=config.max_grad_norm)
            if lazy_groups:
                self._lazy = LazyTableNoise(lazy_groups, generator=rng, secure_mode=config.secure_mode)
                self._deferred = {t.weight: t for t in lazy_groups}
                # on the tables themselves: the state_dict of any module holding one flushes first
                self._state_hooks = [t.register_state_dict_pre_hook(lambda *_: self.flush()) for t in lazy_groups]
            self.sample_rate = 1.0 / len(data_loader)
            # len(data_loader) above already needed a sized dataset; torch's Dataset type has no __len__
            self.expected_batch_size = int(len(cast(Sized, data_loader.dataset)) * self.sample_rate)
            self.optimizer = optimizer
            plain_loader = data_loader
            if config.secure_mode and not config.poisson_sampling:
                from opacus.data_loader import switch_generator

                plain_loader = switch_generator(data_loader=data_loader, generator=rng)
        else:
            mode = "hooks" if self.clipping == "default" else "ghost"
            _register_packed_embedding()
            try:
                out = self._engine.make_private(
                    module=module,
                    optimizer=optimizer,
                    data_loader=data_loader,
                    criterion=nn.MSELoss(),  # unused: step() takes per-sample losses
                    noise_multiplier=config.noise_multiplier,
                    max_grad_norm=config.max_grad_norm,
                    poisson_sampling=False,  # the Poisson loader is built below, with our generator
                    noise_generator=rng,
                    grad_sample_mode=mode,
                    wrap_model=False,
                )
            except NotImplementedError as exc:
                raise UnsupportedModelError(f"Opacus cannot attach clipping={self.clipping!r}: {exc}") from exc
            self._hooks, self.optimizer, plain_loader = out[0], out[1], out[-1]
            self.sample_rate = 1.0 / len(data_loader)
            self.expected_batch_size = out[1].expected_batch_size
        if config.poisson_sampling:
            self.data_loader = DPDataLoader.from_data_loader(data_loader, generator=rng)
        else:
            self.data_loader = plain_loader
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._param_deferred = [(p, p in self._deferred) for p in self._params]  # fixed at attach, read every step
        self._layers = [(n, m) for n, m in module.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]

    # ----------------------------------------------------------------------------- training

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (each one a use of the subsampled Gaussian mechanism)."""
        return self._steps

    def _alive(self) -> None:
        if self._detached:
            raise DPError("this PrivateTraining was detached; attach the module again to keep training")

    def step(self, per_sample_loss: torch.Tensor) -> None:
        """Backward, clip per sample, add noise, and step the optimizer.

        Args:
            per_sample_loss: shape ``(B,)``, one loss per sample (``reduction="none"``) of the
                batch just run through ``module``. For an empty Poisson batch pass the empty
                loss (or ``torch.empty(0)`` if the model cannot run on an empty batch): the
                step then adds noise only, as DP-SGD requires.

        Raises:
            DPValueError: a loss that is not 1-D, or that does not require grad.
            UnsupportedModelError: inputs that are not batch-first (see ``bert_dp_inputs``).
        """
        self._alive()
        if not isinstance(per_sample_loss, torch.Tensor):
            raise DPTypeError(f"per_sample_loss must be a torch.Tensor, got {type(per_sample_loss).__name__}")
        if per_sample_loss.dim() != 1:
            raise DPValueError(
                f"per_sample_loss must have shape (B,) (one loss per sample, reduction='none'), "
                f"got shape {tuple(per_sample_loss.shape)}"
            )
        if self.clipping != "embedding":
            idle = [n or "<root>" for n, m in self._layers if not m.training]
            if idle:
                raise DPValueError(
                    f"clipping={self.clipping!r} (Opacus hooks) records activations only in training mode, but "
                    f"{len(idle)} trainable layer(s) are in eval mode (e.g. {idle[0]!r}); call module.train() "
                    f"(Hugging Face from_pretrained returns a model in eval mode)"
                )
        if per_sample_loss.numel() == 0:
            self._empty_step()
        elif not per_sample_loss.requires_grad:
            raise DPValueError("per_sample_loss must require grad (compute it with grad enabled)")
        elif self.clipping == "embedding":
            self._noised_step(per_sample_loss)
        else:
            with warnings.catch_warnings():
                # Opacus's full backward hooks on layers whose inputs need no grad (embeddings)
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                self._opacus_backward(per_sample_loss)
            self.optimizer.step()
        if self._optimizer_stepped:
            self.optimizer.zero_grad(set_to_none=True)
        if self._hooks is not None:
            self._reset_hook_state()
        self._steps += 1

    def _opacus_backward(self, per_sample_loss: torch.Tensor) -> None:
        """Opacus's backward: per-sample gradients ("default") or norms ("ghost")."""
        batch = per_sample_loss.shape[0]
        if self.clipping == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            for p in self._hooks.trainable_parameters:  # parameters the loss does not reach
                p._norm_sample = per_sample_loss.new_zeros(batch)
            DPTensorFastGradientClipping(self._hooks, self.optimizer, per_sample_loss, "mean").backward()
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        else:
            per_sample_loss.mean().backward()
            for p in self._params:  # parameters the loss does not reach get zero per-sample grads
                if getattr(p, "grad_sample", None) is None:
                    p.grad_sample = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)

    def _reset_hook_state(self) -> None:
        """Drop what Opacus's hooks kept for layers the loss did not reach (e.g. an unused pooler).

        Their activations would pile up and their forward counters would read as weight
        tying in the next step.
        """
        if self._hooks is None:
            return
        for _, m in self._layers:
            if "activations" in m.__dict__:
                m.activations = []
            if "max_batch_len" in m.__dict__:
                del m.max_batch_len
            for p in m.parameters(recurse=False):
                if hasattr(p, "_forward_counter"):
                    p._forward_counter = 0

    def _noise(self, p: torch.Tensor, std: float) -> torch.Tensor:
        if self.config.secure_mode:
            from opacus.optimizers.optimizer import _generate_noise

            return _generate_noise(std=std, reference=p, generator=self._rng, secure_mode=True)
        return torch.empty_like(p).normal_(0.0, std, generator=self._rng)

    def _noised_step(self, per_sample_loss: torch.Tensor | None) -> None:
        """Ours: grad = (N(0, (sigma C)^2) + sum_i clip(g_i)) / expected_batch_size, then step.

        The same distribution as Opacus's ``DPOptimizer`` (noise, then division by the
        expected batch size), written in one pass per parameter. With lazy noise the SGD
        update of each embedding table is applied here as sparse rows, and its noise is
        deferred (``dp._lazy``).
        """
        denom = float(self.expected_batch_size)
        std = self.noise_multiplier * self.max_grad_norm / denom
        # with lazy noise every parameter in a plain-SGD group is updated here, the rest by the optimizer
        try:
            direct = plain_sgd_params(self.optimizer, self._deferred) if self.config.lazy_noise else {}
        except DPValueError:
            assert self._clipper is not None
            self._clipper.discard()  # the refused step leaves no recorded forward behind
            raise
        into: dict[torch.Tensor, torch.Tensor] = {}
        scale: dict[torch.Tensor, float] = {}
        eager: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        for p, deferred in self._param_deferred:
            group = direct.get(p)
            if group is None:  # noise into p.grad, the clipped sum added there, the optimizer steps
                p.grad = grad = self._noise(p, std)
                into[p], scale[p] = grad, 1.0 / denom
                continue
            lr = float(group["lr"])  # plain SGD, applied here: p -= lr * (noise + clipped sum / B)
            data = p.data  # one alias for the clipped rows and the eager noise alike
            into[p], scale[p] = data, -lr / denom
            if not deferred:  # drawn now (eager's order), added after the backward that reads p
                eager.append((data, self._noise(p, std), lr))
        if per_sample_loss is not None:
            assert self._clipper is not None
            self._clipper.accumulate(per_sample_loss, into, scale=scale)
        for data, noise, lr in eager:
            data.add_(noise, alpha=-lr)
        self._optimizer_stepped = len(direct) < len(self._params)
        if self._optimizer_stepped:
            self.optimizer.step()
        if self._lazy is not None:
            self._lazy.add_dp_step(
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
            )
        self._engine.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def flush(self) -> None:
        """With ``lazy_noise``, give every embedding row its pending noise now (no-op otherwise)."""
        if self._lazy is not None:
            self._lazy.flush()

    def _empty_step(self) -> None:
        """Noise-only step: discard what the forward on an empty batch recorded."""
        for m in self.module.modules():
            for attr in ("activations", "max_batch_len"):
                if attr in m.__dict__:
                    delattr(m, attr)
        for p in self.module.parameters():
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0
            p.grad = None
        if self._clipper is not None:
            self._clipper.discard()
            self._noised_step(None)
            return
        for p in self._params:
            if self.clipping == "default":
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()

    # ----------------------------------------------------------------------------- accounting

    def event(self, *, client_id: str, round_index: int) -> SampleLevelEvent:
        """The immutable ledger event for this client's DP-SGD run so far (flushes lazy noise)."""
        self.flush()
        return SampleLevelEvent(
            client_id=client_id,
            round_index=round_index,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=self._steps,
            clipping=self.clipping,
            sampling="poisson" if self.config.poisson_sampling else "fixed_size",
        )

    def opacus_epsilon(self, *, delta: float) -> float:
        """Opacus's own RDP accountant's epsilon for this run (a cross-check of the ledger)."""
        d = chk.open_unit("delta", delta)
        if not self._engine.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(self._engine.accountant.get_epsilon(delta=d))

    # ----------------------------------------------------------------------------- detach

    def __enter__(self) -> "PrivateTraining":
        return self

    def __exit__(self, *exc: object) -> None:
        """Detach whether or not the training raised, so a failed client leaves no state."""
        self.detach()

    def detach(self) -> nn.Module:
        """Remove every hook and Opacus attribute; return the user's own module.

        After this the object refuses ``step``. The module's ``state_dict`` has the same
        keys as before ``attach``; parameters carry no ``grad_sample`` and ``grad`` is None.
        Safe to call after a step raised (call it in a ``finally``, or use ``with``).
        """
        if self._detached:
            return self.module
        self._detached = True
        if self._lazy is not None:
            try:
                self._lazy.flush()
            finally:
                self._lazy.remove()
                for hook in self._state_hooks:
                    hook.remove()
        if self._hooks is not None:
            self._hooks.cleanup()
        if self._clipper is not None:
            self._clipper.remove()
        for p in self.module.parameters():
            for attr in _OPACUS_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
        for m in self.module.modules():
            for attr in _OPACUS_MODULE_ATTRS:
                if attr in m.__dict__:
                    delattr(m, attr)
        if "_dp_attached" in self.module.__dict__:
            del self.module._dp_attached
        return self.module

    def __repr__(self) -> str:
        return (
            f"PrivateTraining(clipping={self.clipping!r}, noise_multiplier={self.noise_multiplier!r}, "
            f"max_grad_norm={self.max_grad_norm!r}, sample_rate={self.sample_rate:.4g}, steps={self._steps})"
        )
