"""The seed report's 13-convolution network, as DATA.md describes it.

Six blocks of 3x3 convolutions (padding 'same') with batch-norm and ReLU, each ended by a 2x2 max-pool in
ceil mode (Keras 'same' pooling: 75 -> 38, 19 -> 10); widths 32..512; then dense 4096 -> 1000 -> classes
with dropout. At 300 x 300 the flattened map is 5 x 5 x 512 = 12,800 and the model has 64,061,370 trainable
parameters plus 5,568 batch-norm running statistics, as Keras counts them.
"""

from __future__ import annotations

import math

from torch import nn

WIDTHS = (32, 64, 128, 256, 384, 512)
DEPTHS = (3, 2, 2, 2, 2, 2)


def feature_side(input_size: int) -> int:
    side = input_size
    for _ in WIDTHS:
        side = math.ceil(side / 2)
    return side


class ProposedCNN(nn.Module):
    def __init__(self, num_classes: int = 2, dropout: float = 0.5, input_size: int = 300):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width, depth in zip(WIDTHS, DEPTHS):
            for _ in range(depth):
                # Keras' epsilon; PyTorch's running-average momentum (Keras' 0.99 needs thousands of steps
                # before evaluation-mode statistics are usable, which short runs never reach).
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width, eps=1e-3),
                           nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        flat = channels * feature_side(input_size) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 1000), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(1000, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    def group_matcher(self, coarse: bool = False):
        """Layer groups for timm's layer-wise learning-rate decay: one per block (coarse) or per convolution."""
        return conv_group_matcher(self.features, coarse)


def conv_group_matcher(features: nn.Sequential, coarse: bool = False):
    """Maps a parameter name to its layer group, for a `features` Sequential followed by a `classifier`: each
    convolution (with the batch-norm after it) is a group, or with `coarse` each block ended by a pooling layer;
    the classifier comes last (timm's convention for an unmatched name)."""
    group, groups = 0, {}
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d) and (not coarse or i == 0):
            group += 1
        elif isinstance(layer, nn.MaxPool2d) and coarse:
            group += 1
        groups[str(i)] = group

    def match(name: str):
        parts = name.split(".")
        return groups[parts[1]] if parts[0] == "features" else float("inf")

    return match
