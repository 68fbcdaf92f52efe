"""The embedded default model: a small CNN small enough to train on two CPU cores.

It is trained on the generated probe set by ``python -m data_prep train-embedded``
to classify each image's whole-image label (its scene or its texture), and is
dissected like any torchvision network. Layer names (for ``layers=[...]``):
``features.conv1`` .. ``features.conv4`` (raw maps), ``features.relu1`` ..
``features.relu4`` (the maps after their ReLU, which are dissected by default),
``classifier.fc1`` (the penultimate 128-d vector) and ``classifier.fc2`` (logits).
"""

from collections import OrderedDict

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Four conv blocks, global average pooling and a two-layer classifier.

    Input (N, 3, 224, 224) gives maps of 112, 56, 28 and 14 pixels at
    conv1..conv4 (before pooling) and logits (N, num_classes).
    """

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, w, kernel_size=5, stride=2, padding=2),
                relu1=nn.ReLU(inplace=True),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(w, 2 * w, kernel_size=3, padding=1),
                relu2=nn.ReLU(inplace=True),
                pool2=nn.MaxPool2d(2),
                conv3=nn.Conv2d(2 * w, 4 * w, kernel_size=3, padding=1),
                relu3=nn.ReLU(inplace=True),
                pool3=nn.MaxPool2d(2),
                conv4=nn.Conv2d(4 * w, 8 * w, kernel_size=3, padding=1),
                relu4=nn.ReLU(inplace=True),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(8 * w, 128),
                relu=nn.ReLU(inplace=True),
                dropout=nn.Dropout(0.2),
                fc2=nn.Linear(128, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) logits."""
        pooled = self.pool(self.features(x)).flatten(1)
        return self.classifier(pooled)
