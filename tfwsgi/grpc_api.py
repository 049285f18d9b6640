"""TensorFlow Serving's gRPC API (``tensorflow.serving.PredictionService`` and ``ModelService``):
parse the request proto, call the core once, render the answer proto.

Each gunicorn worker runs one ``grpc.server`` on ``TFWSGI_PORT``, bound with ``grpc.so_reuseport``
so the kernel spreads new connections over the workers, as grpc's own
examples/python/multiprocessing does ("one server per subprocess, balancing requests between the
servers using the SO_REUSEPORT socket option"). The server starts in the worker, after fork
(``hooks.post_fork``, before the models load: see ``Core``): that README also says fork without
exec is supported only "*before* any gRPC servers have been instantiated", so gunicorn's master
never imports this module, grpcio or the generated services (tensorflow-serving-api's protos
import TensorFlow's package, which only a worker runs). It stops gracefully in ``hooks.worker_exit``.

Implemented: Predict (with ``output_filter``), Classify, Regress, MultiInference,
GetModelMetadata (``signature_def``), GetModelStatus and HandleReloadConfigRequest (applied in
every worker through ``tfwsgi.reloads``). With ``TFWSGI_ENABLE_GRPC_HEALTHCHECK_SERVICE``, gRPC's
standard health service too (``Health``). On the same server, KServe v2's
``inference.GRPCInferenceService`` (``InferenceServicer``: the answers of ``/v2`` over REST,
through the same core; errors with the gRPC code of the error, as Triton's gRPC server gives them).

TF Serving's server options (tensorflow_serving/model_servers/server.cc ``BuildAndStart``):
``SetMaxMessageSize(INT32_MAX)``, then ``--grpc_channel_arguments`` (which override it here),
``--grpc_max_threads`` (its ResourceQuota; here the server's thread pool: a call beyond them waits
for a thread) and ``--enable_serialization_as_tensor_content``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
import numpy as np
from google.protobuf import json_format, text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from . import __version__, metrics, protocodec, sockets, v2protocodec
from .dataplane import DataPlane, ModelSpec, Options, ProtoPredict, V2Predict
from .errors import Code, InvalidArgument, NotFound, TFWSGIError, Unavailable, Unimplemented
from .interfaces import DEFAULT_SIGNATURE
from .manager import AVAILABLE, Listener, ModelManager
from .reloads import UNSUPPORTED, Reloads
from .settings import INT32_MAX, Settings, channel_arguments, from_env
from .source import model_configs
from .v2proto import grpc_predict_v2_pb2 as v2_pb2
from .v2proto import grpc_predict_v2_pb2_grpc as v2_pb2_grpc

log = logging.getLogger("tfwsgi")
T = TypeVar("T")

# tensorflow_serving/model_servers/server.cc: builder.SetMaxMessageSize(tensorflow::kint32max).
MAX_MESSAGE_BYTES = INT32_MAX
_STATUS = {code.value[0]: code for code in grpc.StatusCode}  # grpc's numbers are Code's
LOAD_WAIT_SECONDS = 120.0  # how long a call waits for a starting worker's models (then UNAVAILABLE)
_NO_DEADLINE = 1e8  # seconds: grpcio reports a call without deadline as this far away or more


def _spec(request: Any) -> ModelSpec:
    """The request's ``model_spec``; TF Serving's error when it has none."""
    if not request.HasField("model_spec"):
        raise InvalidArgument("Missing ModelSpec")
    spec = request.model_spec
    choice = spec.WhichOneof("version_choice")
    return ModelSpec(spec.name, spec.version.value if choice == "version" else None,
                     spec.version_label if choice == "version_label" else None)


def _examples(input_: Any) -> np.ndarray:
    """A classify/regress ``Input`` as serialized tf.Examples, as TF Serving feeds them
    (tensorflow_serving/servables/tensorflow/util.cc ``InputToSerializedExampleTensor``: with a
    context, the context's bytes then the example's, which protobuf merges)."""
    kind = input_.WhichOneof("kind")
    if kind == "example_list":
        serialized = [e.SerializeToString() for e in input_.example_list.examples]
    elif kind == "example_list_with_context":
        context = input_.example_list_with_context.context.SerializeToString()
        serialized = [context + e.SerializeToString() for e in input_.example_list_with_context.examples]
    else:
        serialized = []
    if not serialized:
        raise InvalidArgument("Input is empty.")
    out = np.empty(len(serialized), dtype=object)
    out[:] = serialized
    return out


def _model_spec(response: Any, name: str, version: int, signature_name: str) -> None:
    """TF Serving's ``MakeModelSpec`` (tensorflow_serving/servables/tensorflow/util.cc)."""
    response.model_spec.name = name
    response.model_spec.version.value = version
    response.model_spec.signature_name = signature_name


def _label(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_CLASSIFY = "tensorflow/serving/classify"
_REGRESS = "tensorflow/serving/regress"


def _classification(result: Any, outputs: Mapping[str, np.ndarray], n: int) -> None:
    """A ClassificationResult: per example, its (label, score) classes (classifier.cc)."""
    classes, scores = outputs.get("classes"), outputs.get("scores")
    num = classes.shape[1] if classes is not None else scores.shape[1] if scores is not None else 0
    for i in range(n):
        row = result.classifications.add()
        for c in range(num):
            cls = row.classes.add()
            if classes is not None:
                cls.label = _label(classes[i, c])
            if scores is not None:
                cls.score = float(scores[i, c])


def _regression(result: Any, outputs: Mapping[str, np.ndarray]) -> None:
    """A RegressionResult: one value per example (regressor.cc)."""
    for value in outputs["outputs"].reshape(-1):
        result.regressions.add().value = float(value)


def _options(context: grpc.ServicerContext) -> Options:
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE:
        return Options()
    return Options(deadline=time.monotonic() + remaining)


def _answer(context: grpc.ServicerContext, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, or the call aborted with the error's status and message."""
    try:
        return call(*args, **kwargs)
    except TFWSGIError as exc:
        context.abort(_STATUS.get(int(exc.code), grpc.StatusCode.UNKNOWN), exc.message)
    except Exception as exc:
        log.exception("tfwsgi: unexpected error in a gRPC call")
        context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class Core:
    """The worker's DataPlane, once its app is built. The server starts in ``post_fork``, before
    the models load, so that a reload (new workers forked, old ones stopped at once) leaves no
    moment with nothing listening on the port; calls that come meanwhile wait here, as REST
    connections wait in the master's backlog."""

    def __init__(self, dataplane: DataPlane | None = None, reloads: Reloads | None = None) -> None:
        self._dataplane: DataPlane | None = None
        self.reloads = reloads
        self._ready = threading.Event()
        self.health: Health | None = None  # set by build() when the health service is on
        if dataplane is not None:
            self.set(dataplane, reloads)

    def set(self, dataplane: DataPlane, reloads: Reloads | None = None) -> None:
        self._dataplane = dataplane
        self.reloads = reloads
        if self.health is not None:
            self.health.attach(dataplane.manager)
        self._ready.set()

    def use_health(self, health_: Health, settings: Settings) -> None:
        """Keep ``health_`` following the models: the app's manager once there is one; until
        then the configured models, all NOT_SERVING (they are loading)."""
        self.health = health_
        if self._dataplane is not None:
            health_.attach(self._dataplane.manager)
        else:
            health_.update({c.name: False for c in model_configs(settings)})

    def shutdown(self) -> None:
        """The worker starts to stop: its health statuses go NOT_SERVING."""
        if self.health is not None:
            self.health.shutdown()

    def get(self, timeout: float = LOAD_WAIT_SECONDS) -> DataPlane:
        if not self._ready.wait(timeout) or self._dataplane is None:
            raise Unavailable("The server is still loading its models")
        return self._dataplane


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The services server.cc marks SERVING when --enable_grpc_healthcheck_service is on (with gRPC's
# overall "" of the default health service); here they follow this worker's readiness.
SERVER_SERVICES = (health.OVERALL_HEALTH, "ModelService", "PredictionService")


class Health(Listener):
    """The statuses of gRPC's health service in one worker, following its models as
    ``/v2/health/ready`` does (``ModelManager.ready``): the server's names SERVING once every
    configured model has a version available (NOT_SERVING until the worker's app is built), each
    model's name SERVING while it has one; a model no longer configured NOT_SERVING; everything
    NOT_SERVING for good once the worker starts to stop (``shutdown``). A manager listener, so
    every load and unload updates it as it happens. A model named like one of the server's
    services is reported by the server's status."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self.servicer = servicer
        self._lock = threading.Lock()
        self._manager: ModelManager | None = None
        self._models: set[str] = set()
        self.update({})

    def attach(self, manager: ModelManager) -> None:
        """Follow ``manager`` from now on (the worker's app is built)."""
        self._manager = manager
        manager.add_listener(self)
        self.update(manager.ready())

    def state(self, name: str, version: int, old: str | None, new: str) -> None:
        if self._manager is not None:
            self.update(self._manager.ready())

    def unloaded(self, name: str, version: int) -> None:
        if self._manager is not None:
            self.update(self._manager.ready())

    def update(self, ready: Mapping[str, bool]) -> None:
        """Set every status from ``ready`` (each configured model: has it a version available?)."""
        with self._lock:
            for name in self._models - set(ready):
                self.servicer.set(name, NOT_SERVING)
            self._models |= set(ready)
            for name, ok in ready.items():
                if name not in SERVER_SERVICES:
                    self.servicer.set(name, SERVING if ok else NOT_SERVING)
            overall = self._manager is not None and all(ready.values())
            for name in SERVER_SERVICES:
                self.servicer.set(name, SERVING if overall else NOT_SERVING)

    def shutdown(self) -> None:
        """Every service NOT_SERVING from now on (watchers are told at once)."""
        self.servicer.enter_graceful_shutdown()


class _Servicer:
    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def dataplane(self) -> DataPlane:
        return self.core.get()


class PredictionServicer(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):

    def __init__(self, core: Core, tensor_content: bool = False) -> None:
        super().__init__(core)
        # --enable_serialization_as_tensor_content: Tensor::AsProtoTensorContent, not AsProtoField
        self._fill = protocodec.fill_content if tensor_content else protocodec.fill

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = request.model_spec.name
        return _answer(context, metrics.observe_request, quote(name, safe=""), "predict",
                       self._predict, request, context, entrypoint="GRPC")

    def _predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = _spec(request)
        body = ProtoPredict(request.inputs, list(request.output_filter),
                            request.model_spec.signature_name)
        answer = self.dataplane.predict(spec, body, _options(context))
        response = predict_pb2.PredictResponse()
        _model_spec(response, spec.name, answer.version, answer.signature_name)
        for alias, array in body.select(answer.outputs).items():
            self._fill(response.outputs[alias], array)
        return response

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, metrics.observe_request, quote(request.model_spec.name, safe=""),
                       "classify", self._classify, request, context, entrypoint="GRPC")

    def _classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = _spec(request)
        examples = _examples(request.input)
        answer = self.dataplane.classify(spec, request.model_spec.signature_name, examples,
                                         _options(context))
        response = classification_pb2.ClassificationResponse()
        _model_spec(response, spec.name, answer.version, answer.signature_name)
        _classification(response.result, answer.outputs, len(examples))
        return response

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, metrics.observe_request, quote(request.model_spec.name, safe=""),
                       "regress", self._regress, request, context, entrypoint="GRPC")

    def _regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = _spec(request)
        answer = self.dataplane.regress(spec, request.model_spec.signature_name,
                                        _examples(request.input), _options(context))
        response = regression_pb2.RegressionResponse()
        _model_spec(response, spec.name, answer.version, answer.signature_name)
        _regression(response.result, answer.outputs)
        return response

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return _answer(context, metrics.observe_request, quote(name, safe=""), "multi_inference",
                       self._multi_inference, request, context, entrypoint="GRPC")

    def _multi_inference(self, request: Any, context: grpc.ServicerContext) -> Any:
        # tensorflow_serving/servables/tensorflow/multi_inference.cc (TensorFlowMultiInferenceRunner::Infer)
        # checks the tasks; the servable is the first task's (multi_inference_helper.cc).
        name = ""
        signatures: list[str] = []
        for task in request.tasks:
            if not task.model_spec.name:
                raise InvalidArgument("Found ModelSpec with an empty model name.")
            if not name:
                name = task.model_spec.name
            elif name != task.model_spec.name:
                raise InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same "
                                      "model name.")
            signature = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature in signatures:
                raise InvalidArgument(f"Duplicate evaluation of signature: {signature}")
            signatures.append(signature)
        first = request.tasks[0] if request.tasks else inference_pb2.InferenceTask()
        servable, signature_def = self.dataplane.metadata(_spec(first))
        for task, signature in zip(request.tasks, signatures, strict=True):
            if signature not in signature_def["signature_def"]:
                raise InvalidArgument(f"Requested signature not found in model graph: {signature}")
            if task.method_name not in (_CLASSIFY, _REGRESS):
                raise Unimplemented(f"Unsupported signature method_name: {task.method_name}")
        examples = _examples(request.input)
        spec = ModelSpec(servable.name, servable.version)  # every task on the version resolved
        options = _options(context)
        response = inference_pb2.MultiInferenceResponse()
        for task, signature in zip(request.tasks, signatures, strict=True):
            result = response.results.add()
            result.model_spec.CopyFrom(task.model_spec)
            result.model_spec.version.value = servable.version
            if task.method_name == _CLASSIFY:
                answer = self.dataplane.classify(spec, signature, examples, options)
                _classification(result.classification_result, answer.outputs, len(examples))
            else:
                _regression(result.regression_result, self.dataplane.regress(spec, signature, examples,
                                                                             options).outputs)
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, self._metadata, request)

    def _metadata(self, request: Any) -> Any:
        # tensorflow_serving/model_servers/get_model_metadata_impl.cc, ValidateGetModelMetadataRequest
        spec = _spec(request)
        if not request.metadata_field:
            raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise InvalidArgument(f"Metadata field {field} is not supported")
        servable, signature_def = self.dataplane.metadata(spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        sig_map = json_format.ParseDict(signature_def, get_model_metadata_pb2.SignatureDefMap())
        response.metadata["signature_def"].Pack(sig_map)
        return response


class ModelServicer(_Servicer, model_service_pb2_grpc.ModelServiceServicer):

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, self._status, request)

    def _status(self, request: Any) -> Any:
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        for s in self.dataplane.status(_spec(request)):
            status = response.model_version_status.add()
            status.version = s.version
            status.state = states.Value(s.state)
            status.status.error_code = Code.of(s.error_code).value
            status.status.error_message = s.error_message
        return response

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:
        # tensorflow_serving/model_servers/model_service_impl.cc: only a model_config_list; the
        # outcome is the gRPC status and the response's StatusProto; the metrics it names are
        # TF Serving's own (tsl monitoring), which tfwsgi has not: each is reported with increase 0.
        _answer(context, self._reload, request, context)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = Code.OK.value
        for name in request.metric_names:
            response.metric.add(name=name, int64_value_increase=0)
        return response

    def _reload(self, request: Any, context: grpc.ServicerContext) -> None:
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument(UNSUPPORTED)
        self.core.get()  # a starting worker's call waits for its models first
        reloads = self.core.reloads
        if reloads is None:
            raise Unimplemented("HandleReloadConfigRequest is not served by this process")
        log.info("tfwsgi: pid %d HandleReloadConfigRequest: %d models", os.getpid(),
                 len(request.config.model_config_list.config))
        reloads.reload(text_format.MessageToString(request.config), _options(context).deadline)


V2_SERVER_NAME = "tfwsgi"  # /v2's (tfwsgi.v2.SERVER_NAME, EXTENSIONS)
V2_EXTENSIONS = ["binary_tensor_data"]
_INT64_MAX = 2**63 - 1


def v2_spec(name: str, version: str) -> ModelSpec:
    """A v2 model name and version string: "" the latest, digits a version, else a label (/v2's)."""
    if not version:
        return ModelSpec(name)
    if version.isdigit():
        if int(version) > _INT64_MAX:
            raise InvalidArgument(f"Failed to convert version: {version} to numeric.")
        return ModelSpec(name, int(version))
    return ModelSpec(name, label=version)


class InferenceServicer(_Servicer, v2_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2's ``inference.GRPCInferenceService``: /v2's answers over gRPC."""

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return v2_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready when this worker has a version of every configured model (at once: no wait)."""
        try:
            dataplane = self.core.get(timeout=0)
        except Unavailable:
            return v2_pb2.ServerReadyResponse(ready=False)
        return v2_pb2.ServerReadyResponse(ready=all(dataplane.manager.ready().values()))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, self._model_ready, request, context)

    def _model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        """ready; or not ready (a version loading, unloaded or failed: why, in the trailing
        metadata ``tfwsgi-not-ready``); NOT_FOUND for no such model or version."""
        dataplane = self.dataplane
        spec = v2_spec(request.name, request.version)
        try:
            dataplane.servable(spec)
        except NotFound as exc:
            states = dataplane.status(ModelSpec(spec.name, spec.version))  # NotFound: unknown
            detail = "; ".join(f"version {s.version} is {s.state}"
                               + (f": {s.error_message}" if s.error_message else "") for s in states)
            context.set_trailing_metadata((("tfwsgi-not-ready", f"{exc.message} ({detail})"),))
            return v2_pb2.ModelReadyResponse(ready=False)
        return v2_pb2.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return v2_pb2.ServerMetadataResponse(name=V2_SERVER_NAME, version=__version__,
                                             extensions=V2_EXTENSIONS)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, self._model_metadata, request)

    def _model_metadata(self, request: Any) -> Any:
        """The default signature's inputs and outputs, as /v2/models/{m}[/versions/{v}]."""
        dataplane = self.dataplane
        servable, signature_defs = dataplane.metadata(v2_spec(request.name, request.version))
        sig = signature_defs.get("signature_def", {}).get(DEFAULT_SIGNATURE)
        if sig is None:
            raise InvalidArgument(f'Serving signature name: "{DEFAULT_SIGNATURE}" not found in '
                                  "signature def")
        versions = sorted(s.version for s in dataplane.status(ModelSpec(servable.name))
                          if s.state == AVAILABLE)
        response = v2_pb2.ModelMetadataResponse(name=servable.name, versions=[str(v) for v in versions],
                                                platform="tensorflow_savedmodel")
        v2protocodec.tensor_metadata(response.inputs, sig.get("inputs", {}))
        v2protocodec.tensor_metadata(response.outputs, sig.get("outputs", {}))
        return response

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, metrics.observe_request, quote(request.model_name, safe=""), "predict",
                       self._infer, request, context, entrypoint="GRPC")

    def _infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = v2_spec(request.model_name, request.model_version)
        infer_request = v2protocodec.parse_infer(request)
        answer = self.dataplane.predict(spec, V2Predict(infer_request), _options(context))
        return v2protocodec.encode_infer(v2_pb2.ModelInferResponse(), spec.name, answer.version,
                                         infer_request, answer.outputs)


def threads(settings: Settings | None = None) -> int:
    """``--grpc_max_threads``, or TF Serving's default: 4 × the cores (this worker's)."""
    if settings is not None and settings.grpc_max_threads:
        return settings.grpc_max_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 4 * max(1, cores)


def server_options(settings: Settings) -> list[tuple[str, int | str]]:
    """grpc.server's options: SO_REUSEPORT, TF Serving's message limits (int32 max), the connection
    age (``TFWSGI_GRPC_MAX_CONNECTION_AGE_MS``), then
    ``grpc_channel_arguments``, which override them (one value per key)."""
    options: dict[str, int | str] = {"grpc.so_reuseport": 1,
                                     "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
                                     "grpc.max_send_message_length": MAX_MESSAGE_BYTES}
    if settings.grpc_max_connection_age_ms > 0:
        # A graceful GOAWAY after about this long (grpc's ±10% jitter): the client reconnects
        # (see drain).
        options["grpc.max_connection_age_ms"] = settings.grpc_max_connection_age_ms
    options.update(channel_arguments(settings.grpc_channel_arguments))
    return list(options.items())


def build(core: Core | DataPlane, settings: Settings | None = None,
          reloads: Reloads | None = None) -> grpc.Server:
    """A gRPC server with the services over ``core`` (and ``reloads``), configured by ``settings``
    (default: the environment's), not yet bound or started."""
    settings = settings or from_env()
    if not isinstance(core, Core):
        core = Core(core, reloads)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads(settings), thread_name_prefix="tfwsgi-grpc"),
        options=server_options(settings))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(core, settings.enable_serialization_as_tensor_content), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), server)
    v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core), server)
    if settings.enable_grpc_healthcheck_service:
        servicer = health.HealthServicer()
        core.use_health(Health(servicer), settings)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server


def serve(core: Core, port: int, settings: Settings | None = None) -> grpc.Server:
    """Start this worker's gRPC server on ``port`` (0.0.0.0). A port that cannot be bound stops
    the worker, as it stops TF Serving."""
    server = build(core, settings)
    server.add_insecure_port(f"0.0.0.0:{port}")  # raises RuntimeError when it cannot bind
    server.start()
    log.info("tfwsgi: worker %d serves gRPC on port %d", os.getpid(), port)
    return server


def stop(server: grpc.Server, grace: float) -> None:
    """Refuse new calls, let the ones in flight finish for up to ``grace`` seconds."""
    server.stop(grace).wait()


def drain(server: grpc.Server, port: int, timeout: float, poll: float = 0.05) -> None:
    """Leave without failing a call that another worker could answer, within ``timeout`` s.

    ``server.stop`` alone fails calls: from the moment it is called, grpc's core cancels (status
    CANCELLED) every call it has not yet handed to the servicer and every call that reaches it
    before the client has read the GOAWAY (core/server/server.cc, ``KillPendingWorkLocked`` and
    ``StartNewRpc`` when ``ShutdownCalled()``; grpc/grpc#41785), and a busy client sends some.
    So first the worker stops listening (new connections go to the other workers on the port),
    then waits while its connections leave on their own: each gets a graceful GOAWAY at its
    ``max_connection_age`` (the server is not shutting down, so calls that cross it are served,
    and later ones go to the client's new connection). When none is left, or no other process
    listens on the port (the whole server is stopping: nowhere to send anyone), the stop."""
    started = time.monotonic()
    deadline = started + timeout
    try:
        if sockets.stop_listening(port):
            # grpc then logs "Closing acceptor. Failed accept4: Invalid argument": expected.
            log.info("tfwsgi: worker %d left gRPC port %d; its %d connections move to the other "
                     "workers", os.getpid(), port, sockets.connections(port))
            while (time.monotonic() < deadline and sockets.connections(port)
                   and sockets.others_listen(port)):
                time.sleep(poll)
    except OSError as exc:  # no /proc: stop at once
        log.warning("tfwsgi: gRPC connections not drained: %s", exc)
    stop(server, max(1.0, deadline - time.monotonic()))
    log.info("tfwsgi: worker %d stopped its gRPC server in %.1fs", os.getpid(), time.monotonic() - started)
