"""The trimming task-vector merges: `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`,
`della`, `della_linear`. One compute (surgery/compute/sparse.py) with mergekit's trims and defaults.

| op               | trim      | signs elected | normalize | rescale |
| ties             | magnitude | yes           | yes       | no      |
| dare_ties        | random    | yes           | no        | yes     |
| dare_linear      | random    | no            | no        | yes     |
| breadcrumbs      | outliers  | no            | no        | no      |
| breadcrumbs_ties | outliers  | yes           | no        | no      |
| della            | della     | yes           | yes       | yes     |
| della_linear     | della     | no            | no        | yes     |

The random trims are seeded (`seed`, default 0, recorded in surgery.json): one seed, one output, byte for
byte, on any block size or device; their noise is surgery's own, so they match mergekit in distribution
(the kept fraction, the rescale), not entry by entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, create_model, field_validator

from surgery.compute.sparse import ModelTrim, SparseMerge, Trim
from surgery.errors import SurgeryError
from surgery.ops.context import OpContext
from surgery.ops.registry import Op
from surgery.ops.task_vectors import MergeStep, TrimmedModel, bare_paths, check_settings, merge_inputs, merged_view
from surgery.ops.varying import Varying, depth_of, first_of
from surgery.recipe.view import ModelView


@dataclass(frozen=True)
class Family:
    """One op of the family: its trim, whether signs are elected, and mergekit's defaults."""

    trim: Trim
    consensus: bool
    normalize: bool
    rescale: bool
    paper: str
    density: float | None = None  # the default density; None: the plan must give one


FAMILY = {
    "ties": Family("magnitude", True, True, False,
                   'Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"', density=0.2),
    "dare_ties": Family("random", True, False, True,
                        'Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous '
                        'Models as a Free Lunch" (DARE), with TIES sign election'),
    "dare_linear": Family("random", False, False, True,
                          'Yu et al. 2024, "Language Models are Super Mario" (DARE)'),
    "breadcrumbs": Family("outliers", False, False, False,
                          'Davari and Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with '
                          'Sparse Masks"'),
    "breadcrumbs_ties": Family("outliers", True, False, False,
                               'Davari and Belilovsky 2024, "Model Breadcrumbs", with TIES sign election'),
    "della": Family("della", True, True, True,
                    'Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through '
                    'Magnitude-Based Sampling"'),
    "della_linear": Family("della", False, False, True, 'Deep et al. 2024, "DELLA-Merging" (without sign election)'),
}
GAMMA, EPSILON = 0.01, 0.15  # mergekit's defaults


class SparseStepBase(MergeStep):
    """Trim each task vector, rescale, weight, [elect signs], combine, scale by lambda, add to the base."""

    edits_any_stack: ClassVar[bool] = True
    model_config = ConfigDict(populate_by_name=True)

    op: str
    models: list[TrimmedModel] = Field(min_length=1)
    density: Varying | None = Field(default=None, description="Fraction of each task vector's entries kept.")
    gamma: Varying | None = Field(default=None, description="breadcrumbs: fraction of the largest entries dropped.")
    epsilon: Varying | None = Field(default=None, description="della: keep probabilities spread density +- epsilon.")
    lam: Varying = Field(default=1.0, alias="lambda", description="Scale of the merged task vector.")
    normalize: bool | None = Field(default=None, description="Divide by the summed weights (the op's default if unset).")
    rescale: bool | None = Field(default=None, description="Rescale each trimmed task vector to its L1 norm.")
    seed: int | None = Field(default=None, description="dare, della: the seed of the random trim (default 0).")

    _bare_paths = field_validator("models", mode="before")(bare_paths)


def _step_model(name: str) -> type[SparseStepBase]:
    return create_model(f"{name.title().replace('_', '')}Step", __base__=SparseStepBase,
                        op=(Literal[name], ...))  # type: ignore[call-overload]


STEPS = {name: _step_model(name) for name in FAMILY}


def sparse_merge(step: Any, view: ModelView, context: OpContext) -> ModelView:
    family = FAMILY[step.op]
    random = family.trim in ("random", "della")
    if step.seed is not None and not random:
        raise SurgeryError(f"{step.op}: 'seed' applies to the random trims (dare_*, della*) only; remove it")
    for name, applies in (("gamma", family.trim == "outliers"), ("epsilon", family.trim == "della")):
        if not applies and (getattr(step, name) is not None or any(getattr(m, name) is not None for m in step.models)):
            raise SurgeryError(f"{step.op}: '{name}' does not apply to {step.op}; remove it")
    base, models = merge_inputs(step.op, [m.model for m in step.models], view, context, step.tokenizer)
    settings: dict[str, Any] = {"lambda": step.lam, "density": step.density, "gamma": step.gamma,
                                "epsilon": step.epsilon}
    for m in step.models:
        settings.update({f"{m.model}'s {key}": getattr(m, key) for key in ("weight", "density", "gamma", "epsilon")})
    check_settings(step.op, base, settings)
    seed = step.seed if step.seed is not None else 0
    if random:
        context.fits.append({"seed": seed})
    normalize = family.normalize if step.normalize is None else step.normalize
    rescale = family.rescale if step.rescale is None else step.rescale

    def update_for(name: str, shape: tuple[int, ...]) -> SparseMerge:
        t = depth_of(base, name)
        trims = []
        for m in step.models:
            density = first_of(name, t, family.density if family.density is not None else float("nan"),
                               m.density, step.density)
            if density != density:  # nan: no level gave one
                raise SurgeryError(f"{step.op}: give density (the fraction of each task vector kept, e.g. "
                                   f"density: 0.5); none is set for {m.model} on {name}")
            trim = ModelTrim(first_of(name, t, 1.0, m.weight), density,
                             gamma=first_of(name, t, GAMMA, m.gamma, step.gamma),
                             epsilon=first_of(name, t, EPSILON, m.epsilon, step.epsilon))
            trims.append(_checked(step.op, family, trim, f"{m.model} on {name}"))
        return SparseMerge(tuple(trims), shape, family.trim, family.consensus, normalize, rescale,
                           first_of(name, t, 1.0, step.lam), seed, name)

    return merged_view(step.op, base, [base, *models], update_for, step.dtype)


def _checked(op: str, family: Family, trim: ModelTrim, where: str) -> ModelTrim:
    """Settings a trim cannot honour, refused before anything is written."""
    if not 0 < trim.density <= 1:
        raise SurgeryError(f"{op}: density {trim.density:g} for {where} is outside (0, 1]; it is the fraction of the "
                           "task vector kept (0 would keep nothing)")
    if family.trim == "outliers" and not 0 <= trim.gamma < 1:
        raise SurgeryError(f"{op}: gamma {trim.gamma:g} for {where} is outside [0, 1)")
    if family.trim == "della" and trim.epsilon < 0:
        raise SurgeryError(f"{op}: epsilon {trim.epsilon:g} for {where} is negative; it is the spread of the keep "
                           "probabilities around density (a negative one would favour the smaller entries)")
    if family.trim == "della" and trim.density < 1 and not (trim.density - trim.epsilon > 0
                                                           and trim.density + trim.epsilon < 1):
        raise SurgeryError(f"{op}: density +- epsilon must lie inside (0, 1); {where} has density {trim.density:g} "
                           f"and epsilon {trim.epsilon:g}")
    return trim


def describe(step: Any) -> str:
    listed = ", ".join(f"{m.model} (weight {m.weight}" + (f", density {m.density}" if m.density is not None else "")
                       + ")" for m in step.models)
    options = [f"{key} {getattr(step, key)}" for key in ("density", "gamma", "epsilon", "seed", "normalize", "rescale")
               if getattr(step, key) is not None]
    if step.lam != 1.0:
        options.append(f"lambda {step.lam}")
    return f"Task vectors of {listed} trimmed and merged into the base (`{step.op}`{', ' if options else ''}" \
           f"{', '.join(options)})."


def _example(name: str) -> dict[str, Any]:
    example: dict[str, Any] = {"op": name, "models": ["./prose", "./code"], "density": 0.5}
    if FAMILY[name].trim == "della":
        example["epsilon"] = 0.1
    return example


OPS = tuple(Op(name, STEPS[name], sparse_merge, describe, family.paper, _example(name))
            for name, family in FAMILY.items())
