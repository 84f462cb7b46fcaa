"""One validated service config (`service.py`: file < environment < flags) made of one section per stage.

Config imports no stage; stages import their section from here.
"""

from streamguard.config.cluster import ClusterSettings
from streamguard.config.service import OTHER_VARIABLES, ConfigError, ServiceConfig, load_config
from streamguard.config.stages import (
    BatcherSettings,
    CardThresholds,
    EventSettings,
    FaceSettings,
    ParticipantSettings,
    SamplingSettings,
    ScoringSettings,
    SourceSettings,
)
from streamguard.config.streams import PULL_SCHEMES, StreamSpec
from streamguard.config.triton import TritonSettings
from streamguard.config.whip import IceServerSettings, WhipSettings

__all__ = [
    "OTHER_VARIABLES",
    "PULL_SCHEMES",
    "BatcherSettings",
    "CardThresholds",
    "ClusterSettings",
    "ConfigError",
    "EventSettings",
    "FaceSettings",
    "IceServerSettings",
    "ParticipantSettings",
    "SamplingSettings",
    "ScoringSettings",
    "ServiceConfig",
    "SourceSettings",
    "StreamSpec",
    "TritonSettings",
    "WhipSettings",
    "load_config",
]
