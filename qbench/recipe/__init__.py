"""The recipe: a YAML file validated into typed models at load time.

Every error names the file and the field path, e.g.
`recipes/x.yaml: quantizers[2].weights.bits: must be between 2 and 8`. `load.py` reads the
file (a bounded YAML loader), `schema.py` is the `Recipe` model, `errors.py` turns validation
errors into those lines; the sections are defined beside what they configure.
"""

from qbench.checkpoints.spec import CheckpointSpec, TrainSpec
from qbench.eval.specs import EvalSpec, PerplexitySpec, TaskOptions, TaskSpec
from qbench.recipe.errors import RecipeError, field_path
from qbench.recipe.load import load_recipe
from qbench.recipe.schema import GateSpec, Recipe, ReportSpec, ResourcesSpec

__all__ = [
    "CheckpointSpec",
    "EvalSpec",
    "GateSpec",
    "PerplexitySpec",
    "Recipe",
    "RecipeError",
    "ReportSpec",
    "ResourcesSpec",
    "TaskOptions",
    "TaskSpec",
    "TrainSpec",
    "field_path",
    "load_recipe",
]
