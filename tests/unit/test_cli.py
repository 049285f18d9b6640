"""tfwsgi-model-server's command line (tfwsgi/cli.py): TF Serving's flags to TFWSGI_* variables.

``parse`` is pure (argv and an environment in, an invocation out); ``main`` only prints or execs.
"""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest

from tfwsgi import cli
from tfwsgi.settings import SETTINGS, Settings, from_env

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model_name=m", "--model_base_path=/srv/m"]


def serve(*argv: str, env: dict[str, str] | None = None) -> cli.Invocation:
    invocation = cli.parse(list(argv), env or {})
    assert invocation.action == "serve"
    return invocation


def settings(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return from_env(serve(*argv, env=env).env)


def refused(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(cli.UsageError) as info:
        cli.parse(list(argv), env or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tf_serving_command_line_becomes_settings() -> None:
    s = settings("--port=8500", "--rest_api_port=8601", "--model_name=half_plus_two",
                 "--model_base_path=/models/half_plus_two", "--enable_batching",
                 "--batching_parameters_file=/etc/batching.txt", "--rest_api_timeout_in_ms=500",
                 "--file_system_poll_wait_seconds=0", "--enable_model_warmup=false",
                 "--saved_model_tags=serve,gpu", "--max_num_load_retries=0",
                 "--rest_api_enable_cors_support=true", "--monitoring_config_file=/etc/mon.txt")
    assert (s.model_name, s.model_base_path) == ("half_plus_two", "/models/half_plus_two")
    assert (s.rest_api_port, s.rest_api_timeout_in_ms) == (8601, 500)
    assert s.enable_batching and s.rest_api_enable_cors_support and not s.enable_model_warmup
    assert s.batching_parameters_file == "/etc/batching.txt"
    assert s.file_system_poll_wait_seconds == 0 and s.max_num_load_retries == 0
    assert s.saved_model_tags == "serve,gpu"
    assert s.monitoring_config_file == "/etc/mon.txt"


def test_every_setting_is_a_flag_of_its_name() -> None:
    for s in SETTINGS:
        flag = f"--{s.name}" if s.type is bool else f"--{s.name}={s.default}"
        try:
            cli.read_flags([flag])
        except cli.UsageError as exc:  # a default a validator refuses (an empty path is fine)
            pytest.fail(f"{flag}: {exc}")
    assert settings(*MODEL, "--workers=3", "--custom_op_modules=tensorflow_text").workers == 3


def test_flags_not_given_keep_the_environment_and_flags_beat_it() -> None:
    env = {"TFWSGI_ENABLE_BATCHING": "true", "TFWSGI_REST_API_PORT": "9000", "PATH": "/bin"}
    invocation = serve(*MODEL, "--rest_api_port=9100", env=env)
    assert invocation.env["PATH"] == "/bin"
    s = from_env(invocation.env)
    assert s.enable_batching and s.rest_api_port == 9100


def test_the_last_of_a_repeated_flag_wins_as_in_tf_serving() -> None:
    # The Docker image's entrypoint passes its flags first and the user's ("$@") after them.
    assert settings("--model_name=a", "--model_base_path=/a", "--model_name=b").model_name == "b"


@pytest.mark.parametrize("argv,named", [
    (["--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["--model_nme=x"], "unknown flag --model_nme"),
    (["serve"], "unknown argument 'serve'"),
    (["-w", "2"], "unknown argument '-w'"),
    (["--ssl_config_file=/ssl.txt"], "--ssl_config_file is a "
     "tensorflow_model_server flag tfwsgi does not support: gRPC with TLS"),
    (["--grpc_socket_path=/run/tfs.sock"], "--grpc_socket_path is a tensorflow_model_server flag"),
    (["--rest_api_num_threads=8"], "--rest_api_num_threads is a tensorflow_model_server flag"),
    (["--per_process_gpu_memory_fraction=0.5"], "--per_process_gpu_memory_fraction is a"),
    (["--platform_config_file=/p"], "--platform_config_file is a"),
])
def test_unknown_and_unsupported_flags_are_refused_by_name(argv: list[str], named: str) -> None:
    assert named in refused(*MODEL, *argv)


@pytest.mark.parametrize("flag,message", [
    ("--enable_batching=yes", "--enable_batching=yes: expected true or false"),
    ("--rest_api_port=85o1", "--rest_api_port=85o1: expected an integer"),
    ("--rest_api_port=1.5", "expected an integer"),
    ("--rest_api_port", "--rest_api_port needs a value"),
    ("--rest_api_port=70000", "--rest_api_port=70000: must be a TCP port"),
    ("--rest_api_port=0", "--rest_api_port=0 turns TF Serving's REST API off"),
    ("--file_system_poll_wait_seconds=-1", "must be >= 0"),
    ("--saved_model_tags=,", "--saved_model_tags=,: must name at least one tag"),
    ("--custom_op_modules=tensorflow-text", "'tensorflow-text' is not a Python module name"),
])
def test_bad_values_are_refused_with_the_flag_named(flag: str, message: str) -> None:
    assert message in refused(*MODEL, flag)


def test_tf_serving_defaults_that_tfwsgi_shares() -> None:
    s = settings("--model_base_path=/srv/m")
    assert s.model_name == "default"  # main.cc / server.cc Options: model_name("default")
    assert s.saved_model_tags == "serve"  # kSavedModelTagServe
    assert (s.file_system_poll_wait_seconds, s.max_num_load_retries) == (1, 5)
    assert s.load_retry_interval_micros == 60_000_000 and s.rest_api_timeout_in_ms == 30_000
    assert s.enable_model_warmup and not s.enable_batching and not s.rest_api_enable_cors_support
    assert settings("--model_base_path=/srv/m", "--enable_signature_method_name_check=false") == s


def test_warmup_iterations_zero_is_tf_servings_default() -> None:
    # server.cc sets num_request_iterations "only if > 0".
    assert settings(*MODEL, "--num_request_iterations_for_warmup=0").num_request_iterations_for_warmup == 1
    assert settings(*MODEL, "--num_request_iterations_for_warmup=3",
                    "--num_request_iterations_for_warmup=0").num_request_iterations_for_warmup == 1
    assert settings(*MODEL, "--num_request_iterations_for_warmup=4").num_request_iterations_for_warmup == 4


def test_session_parallelism_as_server_cc_applies_it() -> None:
    s = settings(*MODEL, "--tensorflow_session_parallelism=3")
    assert (s.tensorflow_intra_op_parallelism, s.tensorflow_inter_op_parallelism) == (3, 3)
    s = settings(*MODEL, "--tensorflow_session_parallelism=3", "--tensorflow_intra_op_parallelism=2")
    assert (s.tensorflow_intra_op_parallelism, s.tensorflow_inter_op_parallelism) == (2, 0)
    s = settings(*MODEL, "--tensorflow_session_parallelism=3",
                 env={"TFWSGI_TENSORFLOW_INTER_OP_PARALLELISM": "1"})
    assert (s.tensorflow_intra_op_parallelism, s.tensorflow_inter_op_parallelism) == (0, 1)
    assert "You cannot configure all" in refused(
        *MODEL, "--tensorflow_session_parallelism=3", "--tensorflow_intra_op_parallelism=2",
        "--tensorflow_inter_op_parallelism=1")


def test_no_model_flag_serves_the_docker_images_model() -> None:
    invocation = serve()
    s = from_env(invocation.env)
    assert (s.model_name, s.model_base_path) == ("model", "/models/model")
    assert any("/models/model" in note for note in invocation.notes)
    s = settings(env={"MODEL_NAME": "resnet", "MODEL_BASE_PATH": "/data"})
    assert (s.model_name, s.model_base_path) == ("resnet", "/data/resnet")


def test_model_flags_or_tfwsgi_model_settings_leave_the_docker_convention_out(tmp_path: Path) -> None:
    docker = {"MODEL_NAME": "resnet", "MODEL_BASE_PATH": "/data"}
    assert settings("--model_base_path=/srv/x", env=docker).model_name == "default"
    s = settings(env={**docker, "TFWSGI_MODEL_BASE_PATH": "/srv/y", "TFWSGI_MODEL_NAME": "y"})
    assert (s.model_name, s.model_base_path) == ("y", "/srv/y")
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "c" base_path: "/srv/c" } }')
    s = settings(f"--model_config_file={config}", env=docker)
    assert s.model_config_file == str(config) and s.model_base_path == ""
    assert "no model to serve" in refused("--model_name=x", env=docker)


def test_a_bad_model_config_file_is_one_line(tmp_path: Path) -> None:
    assert "cannot read" in refused(f"--model_config_file={tmp_path}/missing.config")


def test_port_is_the_grpc_port_setting() -> None:
    invocation = serve(*MODEL, "--port=9500", "--rest_api_port=8501")
    assert invocation.env["TFWSGI_PORT"] == "9500"
    assert from_env(invocation.env).port == 9500
    assert not [n for n in invocation.notes if "gRPC" in n]
    assert from_env(serve(*MODEL, "--port=0").env).port == 0  # gRPC off
    assert "--port=70000: must be a TCP port (1-65535) or 0 (off)" in refused(*MODEL, "--port=70000")


def test_grpc_flags_are_settings() -> None:
    s = settings("--grpc_max_threads=3", "--enable_grpc_healthcheck_service",
                 "--enable_serialization_as_tensor_content=true",
                 "--grpc_channel_arguments=grpc.max_receive_message_length=4096,"
                 "grpc.primary_user_agent=tfs")
    assert s.grpc_max_threads == 3
    assert s.enable_grpc_healthcheck_service and s.enable_serialization_as_tensor_content
    assert s.grpc_channel_arguments == "grpc.max_receive_message_length=4096,grpc.primary_user_agent=tfs"
    assert "--grpc_channel_arguments=a=1,b: expected comma-separated key=value, got 'b'" in refused(
        *MODEL, "--grpc_channel_arguments=a=1,b")
    assert "--grpc_max_threads=-1: must be >= 0" in refused(*MODEL, "--grpc_max_threads=-1")


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parse(["--help"], {}).action == "help"
    assert cli.parse(["--version"], {}).action == "version"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("port", "rest_api_port", "saved_model_tags", "custom_op_modules",
                 "tensorflow_session_parallelism", "enable_signature_method_name_check",
                 "grpc_max_threads", "grpc_channel_arguments", "enable_grpc_healthcheck_service",
                 "enable_serialization_as_tensor_content"):
        assert f"--{name}=" in out
    assert "--use_alts_credentials: gRPC with ALTS credentials is not implemented" in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("TensorFlow ModelServer: tfwsgi ")


def test_main_refuses_with_one_line_and_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*MODEL, "--bogus"]) == 2
    assert capsys.readouterr().err == "tfwsgi-model-server: unknown flag --bogus (see --help)\n"


def test_the_console_script_and_python_m_run_main() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"].strip()
    assert scripts == "tfwsgi-model-server = tfwsgi.cli:main"
    assert (ROOT / "tfwsgi" / "__main__.py").read_text().count("from .cli import main") == 1
    assert cli.gunicorn_conf() == str(ROOT / "gunicorn_conf.py")


def test_the_command_stays_tensorflow_free() -> None:
    import subprocess

    code = ("import sys, tfwsgi.cli, tfwsgi.__main__\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_an_env_file_naming_the_model_leaves_the_docker_convention_out(tmp_path: Path) -> None:
    env_file = tmp_path / "tfwsgi.env"
    env_file.write_text("TFWSGI_MODEL_BASE_PATH=/srv/from-file\n")
    invocation = serve(env={"TFWSGI_ENV_FILE": str(env_file)})
    assert "TFWSGI_MODEL_BASE_PATH" not in invocation.env  # gunicorn_conf.py applies the file
    assert not [n for n in invocation.notes if "MODEL_BASE_PATH" in n]
