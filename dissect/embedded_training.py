"""Train the embedded default model (``dissect.embedded_model.SmallCNN``) on the generated probe set.

Two tasks share the network: the image's whole-image label (its scene for scene
images, its texture for texture images; softmax cross-entropy over the first
outputs) and which objects, parts and colours appear in it (multi-label, one
sigmoid output each, binary cross-entropy weighted by ``PRESENCE_WEIGHT``). The
second task asks the network to keep objects, parts and colours apart, as a
real image classifier must, rather than only the background layout that decides
a scene. The recipe (batch normalisation in the model, the presence weight, 6
epochs) was chosen by the detector count of the dissection: see README,
"Trained against random". Images of split ``train`` are used for training,
``val`` for the held-out accuracy, which is printed and written with the class
list to ``metrics.json`` beside the weights (``model.pt``, a plain state_dict).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from dissect.artifacts import write_json_atomic
from dissect.broden import BrodenDataset
from dissect.embedded_model import SmallCNN
from dissect.probe import Preprocessing

#: Must match conf/model/default.yaml (input_size, mean, std).
PREPROCESSING = Preprocessing(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


#: Pixel categories whose presence in an image is the second, multi-label task.
PRESENCE_CATEGORIES = ("object", "part", "color")
#: Weight of the presence loss against the whole-image class loss.
PRESENCE_WEIGHT = 3.0
#: Training epochs of the embedded default model.
EPOCHS = 6


@dataclass(frozen=True)
class LabelledImages:
    """Images (N, 3, S, S) uint8, class indices (N,), presence (N, P) float 0/1, split flags (N,), names."""

    images: torch.Tensor
    targets: torch.Tensor
    presence: torch.Tensor
    is_train: np.ndarray
    class_names: list[str]
    presence_names: list[str]

    @property
    def num_outputs(self) -> int:
        """Outputs of the network: one per class, then one per presence label."""
        return len(self.class_names) + len(self.presence_names)


def whole_image_class(broden: BrodenDataset, i: int) -> int:
    """The global label number of image i's scene, else its texture (the generator gives one of them)."""
    labels = broden.image_labels(i, "scene") or broden.image_labels(i, "texture")
    if not labels:
        raise ValueError(f"image {broden.image_ids[i]} has neither a scene nor a texture label")
    return labels[0]


def load_labelled_images(root: Path, n_images: int | None = None,
                         preprocessing: Preprocessing | None = None) -> LabelledImages:
    """Decode the first n_images (default all) images at the input size, with their class and presence targets."""
    broden = BrodenDataset(root)
    preprocessing = preprocessing or PREPROCESSING
    indices = range(len(broden) if n_images is None else min(n_images, len(broden)))
    numbers = [whole_image_class(broden, i) for i in indices]
    classes = sorted(set(numbers))
    present = [sorted(n for c in PRESENCE_CATEGORIES for n in np.unique(broden.pixel_labels(i, c)) if n > 0)
               for i in tqdm(indices, desc="masks", unit="img")]
    presence_numbers = sorted(set(n for numbers_in in present for n in numbers_in))
    presence = torch.zeros(len(indices), len(presence_numbers))
    for i, numbers_in in enumerate(present):
        presence[i, [presence_numbers.index(n) for n in numbers_in]] = 1.0
    size = preprocessing.input_size
    images = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    for i in tqdm(indices, desc="decode", unit="img"):
        with Image.open(broden.image_path(i)) as image:
            images[i] = preprocessing.load(image)
    return LabelledImages(
        images=images,
        targets=torch.tensor([classes.index(n) for n in numbers]),
        presence=presence,
        is_train=np.array([broden.splits[i] == "train" for i in indices]),
        class_names=[broden.label_names[n] for n in classes],
        presence_names=[broden.label_names[n] for n in presence_numbers],
    )


def accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 128) -> float:
    """Share of images (N, 3, S, S) uint8 whose arg-max over the class logits (the first C outputs) is the target."""
    model.eval()
    n_classes = int(targets.max()) + 1
    correct = 0
    with torch.inference_mode():
        for begin in range(0, len(images), batch_size):
            logits = model(PREPROCESSING.normalise(images[begin:begin + batch_size]))[:, :n_classes]
            correct += int((logits.argmax(1) == targets[begin:begin + batch_size]).sum())
    return correct / max(1, len(images))


def presence_accuracy(model: nn.Module, data: LabelledImages, batch_size: int = 128) -> float:
    """Share of (held-out image, presence label) pairs predicted right by the sign of their logit."""
    model.eval()
    held_out = ~data.is_train
    images, presence = data.images[held_out], data.presence[held_out]
    correct = 0
    with torch.inference_mode():
        for begin in range(0, len(images), batch_size):
            logits = model(PREPROCESSING.normalise(images[begin:begin + batch_size]))[:, len(data.class_names):]
            correct += int(((logits > 0).float() == presence[begin:begin + batch_size]).sum())
    return correct / max(1, presence.numel())


def train(data: LabelledImages, epochs: int, lr: float, seed: int, batch_size: int = 64) -> tuple[SmallCNN, list[float]]:
    """AdamW with a one-cycle schedule on both tasks; returns the model and the mean loss of each epoch."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=data.num_outputs)
    n_classes = len(data.class_names)
    train_images = data.images[data.is_train]
    train_targets = data.targets[data.is_train]
    train_presence = data.presence[data.is_train]
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(train_images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        epoch_losses = []
        bar = tqdm(range(len(train_images) // batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for step in bar:
            batch = order[step * batch_size:(step + 1) * batch_size]
            images = train_images[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            images[flip] = images[flip].flip(-1)
            logits = model(PREPROCESSING.normalise(images))
            loss = (nn.functional.cross_entropy(logits[:, :n_classes], train_targets[batch])
                    + PRESENCE_WEIGHT * nn.functional.binary_cross_entropy_with_logits(logits[:, n_classes:],
                                                                                        train_presence[batch]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            epoch_losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(epoch_losses[-20:]):.3f}")
        losses.append(float(np.mean(epoch_losses)))
    return model.eval(), losses


def train_embedded(data_root: Path, out_dir: Path, epochs: int = EPOCHS, lr: float = 3e-3, seed: int = 0) -> dict:
    """Train, evaluate on the held-out split, write model.pt and metrics.json; return the metrics."""
    started = time.perf_counter()
    data = load_labelled_images(data_root)
    model, losses = train(data, epochs=epochs, lr=lr, seed=seed)
    held_out = ~data.is_train
    metrics = {
        "held_out_accuracy": accuracy(model, data.images[held_out], data.targets[held_out]),
        "train_accuracy": accuracy(model, data.images[data.is_train], data.targets[data.is_train]),
        "chance_accuracy": float(np.bincount(data.targets[held_out].numpy()).max() / held_out.sum()),
        "held_out_presence_accuracy": presence_accuracy(model, data),
        "classes": data.class_names,
        "presence_labels": data.presence_names,
        "num_classes": len(data.class_names),
        "num_outputs": data.num_outputs,
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "epoch_losses": losses,
        "train_images": int(data.is_train.sum()),
        "held_out_images": int(held_out.sum()),
        "data": str(data_root),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
