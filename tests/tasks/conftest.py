"""Tiny trained models on the digits, shared by the technique tests of one session."""

from __future__ import annotations

import pytest

from shrinkfleet.config import DistillConfig, MlpArch, SplitConfig, TrainConfig
from shrinkfleet.datasets import load_sklearn, prepare


@pytest.fixture(scope="session")
def digits():
    return prepare(load_sklearn("digits"), SplitConfig(), seed=0)


@pytest.fixture(scope="session")
def teacher(digits):
    from tasks.teacher import train_teacher

    model, _ = train_teacher(MlpArch(hidden=[64]), TrainConfig(epochs=8, patience=0, learning_rate=3e-3), digits, 0)
    return model


@pytest.fixture(scope="session")
def student(teacher, digits):
    from tasks.distill import distill

    model, _ = distill(teacher, MlpArch(hidden=[32]), DistillConfig(epochs=8, patience=0, learning_rate=5e-3),
                       digits, seed=0)
    return model
