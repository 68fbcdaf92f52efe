"""Label frequency and coverage of a Broden directory counted from its masks, independently of the writer."""

import numpy as np

from dissect.broden import IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset


def label_statistics(data: BrodenDataset) -> tuple[np.ndarray, np.ndarray]:
    """((L+1,) int images holding each label, (L+1,) float its covered share of mask pixels summed over the
    images), counted from every image's decoded masks and whole-image labels (label 0 left at 0)."""
    n_labels = len(data.labels)
    frequency = np.zeros(n_labels + 1, int)
    coverage = np.zeros(n_labels + 1)
    for i in range(len(data)):
        for category in PIXEL_CATEGORIES:
            layers = data.pixel_labels(i, category)
            for number in set(np.unique(layers).tolist()) - {0}:
                frequency[number] += 1
                coverage[number] += (layers == number).any(axis=0).mean()
        for category in IMAGE_CATEGORIES:
            for number in data.image_labels(i, category):
                frequency[number] += 1
                coverage[number] += 1.0
    return frequency, coverage
