"""The model types of this package, in one place: `__init__` registers them with the transformers Auto classes,
`loading` accepts their configs, model cards name and cite them. A new model type is one entry here (plus its config
and model files). No model file imports this module, so it is not part of the remote code a checkpoint ships."""

from dataclasses import dataclass

from .configuration_modsquad import ModSquadConfig
from .configuration_taskexpert import TaskExpertConfig
from .modeling_modsquad import ModSquadForDensePrediction
from .modeling_taskexpert import TaskExpertForDensePrediction


@dataclass(frozen=True)
class ModelType:
    config_class: type
    model_class: type  # what AutoModel gives: the model with its heads
    title: str  # the architecture as model cards name it
    citation: str  # BibTeX of the paper

    @property
    def name(self) -> str:
        return self.config_class.model_type


MODEL_TYPES: dict[str, ModelType] = {
    entry.name: entry
    for entry in (
        ModelType(
            TaskExpertConfig, TaskExpertForDensePrediction, "TaskExpert (Ye & Xu, ICCV 2023)",
            """@inproceedings{ye2023taskexpert,
  title     = {TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial Mixture-of-Experts},
  author    = {Ye, Hanrong and Xu, Dan},
  booktitle = {ICCV},
  year      = {2023}
}""",
        ),
        ModelType(
            ModSquadConfig, ModSquadForDensePrediction, "Mod-Squad (Chen et al., CVPR 2023)",
            """@inproceedings{chen2023modsquad,
  title     = {Mod-Squad: Designing Mixtures of Experts As Modular Multi-Task Learners},
  author    = {Chen, Zitian and Shen, Yikang and Ding, Mingyu and Chen, Zhenfang and Zhao, Hengshuang and Learned-Miller, Erik and Gan, Chuang},
  booktitle = {CVPR},
  year      = {2023}
}""",
        ),
    )
}  # fmt: skip

__all__ = ["MODEL_TYPES", "ModelType"]
