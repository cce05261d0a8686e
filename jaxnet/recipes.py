"""The tutorials' training recipes, one per model: what ``jaxnet train`` uses by default.

Each recipe reproduces the optimizer and hyper-parameters of the tutorial
that defines the model; the CLI's flags override any field.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one tutorial's training run."""

    dataset: str  # data set name for jaxnet.data.load_dataset
    optimizer: str  # name for jaxnet.optim.create_optimizer
    lr: float  # base learning rate
    batch_size: int  # examples per optimizer step
    epochs: int  # passes over the training split
    momentum: float = 0.0  # SGD / RMSprop momentum
    schedule: str = "constant"  # learning-rate schedule name (jaxnet.optim.create_schedule)
    gamma: float = 0.1  # decay factor of the "step"/"exponential" schedules, per epoch
    step_size: int = 1  # epochs between decays of the "step" schedule
    normalize: bool = True  # Normalize(mean, std) after ToTensor; False: ToTensor only (x / 255)
    source: str = ""  # where the recipe comes from


RECIPES: dict[str, Recipe] = {
    # Tutorial "MNIST with an MLP": ToTensor, Adam(lr=0.001), batch 64; plus the learning rate
    # annealed to 0 over the run (torch's CosineAnnealingLR), which ended 5 epochs higher than the
    # constant rate in every run compared (benchmarks/RECIPES.md). examples/mnist_mlp.py keeps
    # the tutorial's constant lr.
    "mlp": Recipe(
        "mnist",
        "adam",
        1e-3,
        64,
        5,
        normalize=False,
        schedule="cosine",
        source="MLP tutorial: ToTensor, Adam lr 1e-3, batch 64; cosine-annealed lr",
    ),
    # Tutorial "784-512-10 net": SGD(lr=0.01, momentum=0.9), batch 64.
    "mlp512": Recipe(
        "mnist",
        "sgd",
        1e-2,
        64,
        5,
        momentum=0.9,
        normalize=False,
        source="784-512-10 tutorial: ToTensor, SGD lr 0.01 momentum 0.9, batch 64",
    ),
    # Tutorial "Flatten-784-128-10": Adam(lr=0.001), batch 64, 10 epochs.
    "mlp128": Recipe(
        "mnist",
        "adam",
        1e-3,
        64,
        10,
        source="nn tutorial: Normalize(0.1307, 0.3081), Adam lr 1e-3, batch 64, 10 epochs",
    ),
    # The tutorial gives the ConvNet no optimizer; PyTorch's own MNIST example
    # (Adadelta lr 1.0, StepLR(step_size=1, gamma=0.7), batch 64) is the usual one.
    "convnet": Recipe(
        "mnist",
        "adadelta",
        1.0,
        64,
        5,
        schedule="step",
        gamma=0.7,
        step_size=1,
        source="pytorch/examples mnist: Adadelta lr 1.0, StepLR gamma 0.7, batch 64",
    ),
    # Tutorial "CIFAR-10": SGD(lr=0.001, momentum=0.9), batch 100, 10 epochs.
    "cifar_cnn": Recipe(
        "cifar10",
        "sgd",
        1e-3,
        100,
        10,
        momentum=0.9,
        source="CIFAR-10 tutorial: SGD lr 1e-3 momentum 0.9, batch 100, 10 epochs",
    ),
    # Not a tutorial's: airbench94 (arXiv 2404.00498), trained by jaxnet.speedrun.train_speedrun, whose
    # SpeedrunRecipe is the whole recipe (9.9 epochs, grouped Nesterov SGD, lookahead, TTA). This entry
    # is its summary in the tutorials' terms: the default group's lr in PyTorch's units, 11.5 / kilostep.
    "cifar_speed": Recipe(
        "cifar10",
        "sgd",
        11.5 / (1024 * (1 + 1 / (1 - 0.85))),
        1024,
        10,
        momentum=0.85,
        source="airbench94: batch 1024, 9.9 epochs, Nesterov SGD by parameter group (jaxnet.speedrun)",
    ),
    # Tutorial "autograd": Linear(1, 1), MSELoss, SGD(lr=0.01), 100 full-batch epochs on y = 2x.
    "linear": Recipe("linear", "sgd", 1e-2, 4, 100, source="autograd tutorial: SGD lr 0.01, 100 epochs"),
}

# A model of your own (--model package.module:factory) has no tutorial: Adam at PyTorch's default
# rate with a constant schedule, the first tutorial's batch size, and --dataset must be given.
USER_MODEL_RECIPE = Recipe(
    "", "adam", 1e-3, 64, 5, source="Adam lr 1e-3 (constant), batch 64, 5 epochs, Normalize(mean, std)"
)


def recipe_for(model: str) -> Recipe:
    """The recipe ``jaxnet train --model MODEL`` starts from: the tutorial's, or :data:`USER_MODEL_RECIPE`.

    >>> recipe_for("mypkg.nets:build").optimizer, recipe_for("convnet").optimizer
    ('adam', 'adadelta')
    """
    return RECIPES.get(model, USER_MODEL_RECIPE)
