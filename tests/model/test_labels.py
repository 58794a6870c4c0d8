"""The ImageNet labels file holds Keras' 1000 labels in class-index order."""

from __future__ import annotations

from collections import Counter

from model.labels import imagenet_labels


def test_imagenet_labels_are_the_1000_classes_in_index_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    anchors = {0: "tench", 1: "goldfish", 88: "macaw", 281: "tabby", 285: "Egyptian_cat", 934: "hotdog"}
    assert {i: labels[i] for i in anchors} == anchors
    assert labels[999] == "toilet_tissue"
    # Keras' index names two pairs of classes alike (the bird and the machine; two swimsuits).
    assert {name: n for name, n in Counter(labels).items() if n > 1} == {"crane": 2, "maillot": 2}
    assert all(name and " " not in name and "," not in name for name in labels)
