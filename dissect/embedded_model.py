"""The embedded default model: a small CNN small enough to train on two CPU cores.

It is trained on the generated probe set by ``python -m data_prep train-embedded``
to classify each image's whole-image label (its scene or its texture) and to
tell which objects, parts and colours it shows, and is dissected like any
torchvision network. Layer names (for ``layers=[...]``): ``features.conv1`` ..
``features.conv4`` (raw maps), ``features.bn1`` .. ``features.bn4`` (batch
normalisation), ``features.relu1`` .. ``features.relu4`` (the maps after their
ReLU, which are dissected by default), ``classifier.fc1`` (the penultimate
128-d vector) and ``classifier.fc2`` (logits).
"""

from collections import OrderedDict

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Four conv blocks (convolution, batch normalisation, ReLU), global average pooling and a two-layer classifier.

    Input (N, 3, 224, 224) gives maps of 112, 56, 28 and 14 pixels at
    conv1..conv4 (before pooling) and logits (N, num_classes). With
    ``batch_norm=False`` the blocks have no normalisation (modules bn1..bn4 are
    absent); trained that way on the generated set, many ReLU units die.
    """

    def __init__(self, num_classes: int, width: int = 16, batch_norm: bool = True) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for block in range(1, 5):
            first = block == 1
            layers[f"conv{block}"] = nn.Conv2d(channels[block - 1], channels[block], kernel_size=5 if first else 3,
                                               stride=2 if first else 1, padding=2 if first else 1)
            if batch_norm:
                layers[f"bn{block}"] = nn.BatchNorm2d(channels[block])
            layers[f"relu{block}"] = nn.ReLU(inplace=True)
            if block < 4:
                layers[f"pool{block}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(channels[4], 128),
                relu=nn.ReLU(inplace=True),
                dropout=nn.Dropout(0.2),
                fc2=nn.Linear(128, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) logits."""
        pooled = self.pool(self.features(x)).flatten(1)
        return self.classifier(pooled)
