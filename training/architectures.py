"""The networks the service runs, by recipe name: `train_model.py` trains them and
`training/challenger.py` retrains them, both from here (the scripts stay thin entry points).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras
from keras import layers

NUM_CLASSES = 10


def build_v1() -> keras.Model:
    """Recipe v1: a small VGG-style CNN returning logits (the service applies the softmax).

    28x28 -> conv32 -> pool -> conv64 x2 -> pool -> conv128 -> global average -> dense 10.
    One conv at full resolution keeps CPU inference cheap; global average pooling instead of
    a big dense layer keeps the parameter count near 130k.
    """
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = _conv_block(inputs, 32)
    x = layers.MaxPooling2D()(x)
    x = _conv_block(x, 64)
    x = _conv_block(x, 64)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = _conv_block(x, 128)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="mnist_cnn")


def build_v2() -> keras.Model:
    """Recipe v2: v1 with a second conv at 7x7, about 2x the parameters, 1.5x the compute.

    28x28 -> conv32 -> pool -> conv64 x2 -> pool -> conv128 x2 -> global average -> dense 10.
    The extra layer works at 7x7, where a conv costs a quarter of one at 14x14, so inference
    stays well under a millisecond per image on one CPU thread.
    """
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = _conv_block(inputs, 32)
    x = layers.MaxPooling2D()(x)
    x = _conv_block(x, 64)
    x = _conv_block(x, 64)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = _conv_block(x, 128)
    x = _conv_block(x, 128)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="mnist_cnn_v2")


@dataclass(frozen=True)
class Recipe:
    """A named way to build the network, and how many epochs it trains by default.

    A recipe with `teachers` first trains those networks (each `teacher_epochs`, seeds
    `seed + 1 ...`) and then the shipped network as their student: it learns from the
    teachers' mean probabilities at `temperature` as well as from the labels, with the
    label's share of the loss `hard_weight`.
    """

    build: Callable[[], keras.Model]
    epochs: int
    description: str
    teachers: tuple[str, ...] = ()  # recipe names whose networks teach
    teacher_epochs: int = 0
    temperature: float = 1.0
    hard_weight: float = 1.0


RECIPES = {
    "v1": Recipe(build_v1, 40, "VGG-style CNN, 4 conv layers, 40 epochs"),
    "v2": Recipe(build_v2, 60, "VGG-style CNN, 5 conv layers (second conv at 7x7), 60 epochs"),
    "v3": Recipe(
        build_v2,
        80,
        "the v2 network, 80 epochs, distilled from 4 teachers (v2, v1, v2, v1; 50 epochs each)",
        teachers=("v2", "v1", "v2", "v1"),
        teacher_epochs=50,
        temperature=3.0,
        hard_weight=0.3,
    ),
}


def _conv_block(x: keras.KerasTensor, filters: int) -> keras.KerasTensor:
    """3x3 conv, batch norm, ReLU (no conv bias: batch norm has its own shift)."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    # Momentum 0.9 instead of 0.99: with ~60 steps an epoch, the slow default lags the
    # fast-changing early weights and makes the validation accuracy jump around.
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)
