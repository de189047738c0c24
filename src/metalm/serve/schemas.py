"""The pydantic models of the service's requests and answers, with the limits in them.

`api_models(limits)` builds them, so that the limits show in the OpenAPI schema as the
constraints of the fields. pydantic is imported when they are built (it comes with the
optional FastAPI).
"""

from types import SimpleNamespace
from typing import Annotated, Any

from metalm.serve.limits import ServeLimits


def api_models(limits: ServeLimits) -> SimpleNamespace:
    """The request and response models, with `limits` in their constraints (so that
    they show in the OpenAPI schema)."""
    Text, Label = _field_types(limits)
    return SimpleNamespace(**_request_models(limits, Text, Label), **_response_models(Label))


def _field_types(limits: ServeLimits) -> tuple[Any, Any]:
    """The types of a text and of a label (a name or an integer), within `limits`."""
    from pydantic import StrictInt, StringConstraints

    text = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.max_text_chars, pattern=r"\S")
    ]
    label_name = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.max_label_chars, pattern=r"\S")
    ]
    return text, label_name | StrictInt


def _request_models(limits: ServeLimits, Text: Any, Label: Any) -> dict[str, type]:
    """CreateTask and ClassifyRequest: the bodies of POST /tasks and of classify."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Example(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: Text
        label: Label

    class CreateTask(BaseModel):
        """Labeled examples of a new task: at least 2 distinct labels."""

        model_config = ConfigDict(extra="forbid")
        examples: list[Example] = Field(min_length=2, max_length=limits.max_task_examples)

        @model_validator(mode="after")
        def _label_count(self) -> "CreateTask":
            distinct = len({e.label for e in self.examples})
            if not 2 <= distinct <= limits.max_labels:
                raise ValueError(
                    f"a task needs 2 to {limits.max_labels} distinct labels, got {distinct}"
                )
            return self

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Text] = Field(min_length=1, max_length=limits.max_batch_texts)

    class ScoreRequest(BaseModel):
        """Labeled texts to score a task on (its labels only)."""

        model_config = ConfigDict(extra="forbid")
        examples: list[Example] = Field(min_length=1, max_length=limits.max_batch_texts)

    return {
        "CreateTask": CreateTask,
        "ClassifyRequest": ClassifyRequest,
        "ScoreRequest": ScoreRequest,
    }


def _response_models(Label: Any) -> dict[str, type]:
    """The answers: TaskInfo, Prediction, ClassifyResponse, TaskList, ScoreResponse,
    Health, Detail."""
    from pydantic import BaseModel, Field

    class TaskInfo(BaseModel):
        task_id: str
        classes: list[Label]
        n_examples: int
        learner: str

    class Prediction(BaseModel):
        label: Label
        probability: float
        probabilities: list[float] = Field(description="one per class, in `classes` order")

    class ClassifyResponse(BaseModel):
        task_id: str
        classes: list[Label]
        predictions: list[Prediction]

    class TaskList(BaseModel):
        tasks: list[TaskInfo]

    class ScoreResponse(BaseModel):
        task_id: str
        classes: list[Label]
        n_texts: int
        accuracy: float
        accuracy_ci95: float
        macro_f1: float
        confusion: list[list[int]] = Field(
            description="confusion[i][j]: texts of classes[i] predicted as classes[j]"
        )

    class Health(BaseModel):
        status: str
        learner: str
        model: str
        tasks: int
        max_tasks: int
        stored_bytes: int
        max_store_bytes: int

    class Detail(BaseModel):
        detail: str

    return {
        "TaskInfo": TaskInfo,
        "Prediction": Prediction,
        "ClassifyResponse": ClassifyResponse,
        "TaskList": TaskList,
        "ScoreResponse": ScoreResponse,
        "Health": Health,
        "Detail": Detail,
    }
