"""A toy training script and a hand-written definition in the SDK's exact shapes.

The script is a real entry point run by the executor in its sandbox (a real
subprocess): it reports what the container contract gave it and prints metric
lines in scripts/metrics.py's formats, with a test accuracy that depends on lr
(best at lr=0.01) so tuning has something to find. Fast: no torch.
"""
from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

from scripts.metrics import METRIC_DEFINITIONS

TOY_TRAIN = r'''
import argparse, json, math, os, signal, sys, time
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, required=True)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--die-once", type=int, default=0)
args = p.parse_args()  # strict: any argument the contract should not pass fails the job
model_dir, out_dir = os.environ["SM_MODEL_DIR"], os.environ["SM_OUTPUT_DATA_DIR"]
ckpt = os.environ["SM_CHECKPOINT_DIR"]
if args.die_once and not os.path.exists(os.path.join(ckpt, "died")):
    open(os.path.join(ckpt, "died"), "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
seen = {"argv": sys.argv[1:], "channel": os.environ["SM_CHANNEL_TRAIN"],
        "files": sorted(os.listdir(os.environ["SM_CHANNEL_TRAIN"])),
        "hps": json.loads(os.environ["SM_HPS"]), "config": sorted(os.listdir(os.environ["SM_INPUT_CONFIG_DIR"])),
        "resource": json.load(open(os.path.join(os.environ["SM_INPUT_CONFIG_DIR"], "resourceconfig.json"))),
        "env": {k: v for k, v in os.environ.items() if k.startswith("SM_") and k != "SM_TRAINING_ENV"}}
score = max(0.0, 1.0 - abs(math.log10(args.lr) + 2.0) / 2.0)
for e in range(1, args.epochs + 1):
    loss = 2.0 / (e * (score + 0.1) + 1)
    print(f"epoch {e}/{args.epochs} train_loss={loss:.6g} train_acc={score:.6g} valid_loss={loss * 1.1:.6g} "
          f"valid_acc={score:.6g} lr={args.lr:.6g} time=0.1s", flush=True)
    time.sleep(args.sleep)
print(f"average validation loss: {loss * 1.1:.6g}")
print(f"test accuracy: {score:.6g}")
with open(os.path.join(model_dir, "model.json"), "w") as f:
    json.dump({"lr": args.lr}, f)
with open(os.path.join(out_dir, "evaluation.json"), "w") as f:
    json.dump({"metrics": {"accuracy": {"value": score}}, "seen": seen}, f)
'''

BUCKET = "s3://toy-bucket"
CODE_URI = f"{BUCKET}/toy/code/sourcedir.tar.gz"
DATA_URI = f"{BUCKET}/toy/data"


def put_toy_code_and_data(store) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        body = TOY_TRAIN.encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    store.put_bytes(CODE_URI, buf.getvalue())
    store.put_bytes(f"{DATA_URI}/train/a.txt", b"x")


def _job_common(out: str, program: str = "train.py") -> dict:
    return {
        "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": "toy:latest",
                                   "MetricDefinitions": copy.deepcopy(METRIC_DEFINITIONS)},
        "OutputDataConfig": {"S3OutputPath": out},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
        "RoleArn": "arn:aws:iam::111111111111:role/x",
        "InputDataConfig": [{"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                             "S3Uri": {"Get": "Parameters.TrainingData"},
                                                             "S3DataDistributionType": "FullyReplicated"}},
                             "ChannelName": "train"}],
    }


def toy_definition(max_jobs: int = 2, parallel: int = 2, sleep: float = 0.0, cache: bool = True) -> dict:
    """Tune -> Train (best lr via Get) -> Model -> Check (metric >= threshold AND JsonGet) -> Register | Fail."""
    code = {"sagemaker_submit_directory": json.dumps(CODE_URI), "sagemaker_program": json.dumps("train.py"),
            "sagemaker_container_log_level": "20", "sagemaker_region": json.dumps("us-east-1")}
    tune_job = _job_common(f"{BUCKET}/toy/tune")
    tune_job["HyperParameterTuningResourceConfig"] = tune_job.pop("ResourceConfig", None) or {
        "InstanceCount": 1, "InstanceType": "ml.m5.large", "VolumeSizeInGB": 30}
    tune_job["StaticHyperParameters"] = {"epochs": "2", "sleep": json.dumps(str(sleep)), **code}
    train = _job_common({"Std:Join": {"On": "/", "Values": [f"{BUCKET}/toy", {"Get": "Execution.PipelineExecutionId"},
                                                              "train"]}})
    train["ResourceConfig"] = {"VolumeSizeInGB": 30, "InstanceCount": 1, "InstanceType": "ml.m5.large"}
    train["HyperParameters"] = {
        "lr": {"Std:Join": {"On": "", "Values": [{"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"}]}},
        "batch-size": {"Std:Join": {"On": "", "Values": [
            {"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['batch-size']"}]}},
        "epochs": "3", **code}
    steps = [
        {"Name": "Tune", "Type": "Tuning", "Arguments": {
            "HyperParameterTuningJobConfig": {
                "Strategy": "Bayesian", "RandomSeed": 7,
                "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": parallel},
                "TrainingJobEarlyStoppingType": "Off",
                "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "test accuracy"},
                "ParameterRanges": {
                    "ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1",
                                                   "ScalingType": "Logarithmic"}],
                    "CategoricalParameterRanges": [{"Name": "batch-size", "Values": ['"32"', '"64"']}]}},
            "TrainingJobDefinition": tune_job}},
        {"Name": "Train", "Type": "Training", "Arguments": train, "DependsOn": ["Tune"],
         "PropertyFiles": [{"PropertyFileName": "Evaluation", "OutputName": "evaluation",
                            "FilePath": "evaluation.json"}]},
        {"Name": "Model-CreateModel", "Type": "Model", "Arguments": {
            "ExecutionRoleArn": "arn:aws:iam::111111111111:role/x",
            "PrimaryContainer": {"Image": "toy-inference:latest",
                                 "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
                                 "ModelDataUrl": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}}}},
        {"Name": "Check", "Type": "Condition", "Arguments": {
            "Conditions": [
                {"Type": "GreaterThanOrEqualTo",
                 "LeftValue": {"Get": "Steps.Train.FinalMetricDataList['test accuracy'].Value"},
                 "RightValue": {"Get": "Parameters.AccuracyThreshold"}},
                {"Type": "GreaterThanOrEqualTo",
                 "LeftValue": {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Train.PropertyFiles.Evaluation"},
                                               "Path": "metrics.accuracy.value"}},
                 "RightValue": {"Get": "Parameters.AccuracyThreshold"}}],
            "IfSteps": [{"Name": "Register-RegisterModel", "Type": "RegisterModel", "Arguments": {
                "ModelPackageGroupName": "toy-group", "ModelApprovalStatus": "PendingManualApproval",
                "InferenceSpecification": {"Containers": [
                    {"Image": "toy-inference:latest",
                     "ModelDataUrl": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}}]}}}],
            "ElseSteps": [{"Name": "Fail", "Type": "Fail", "Arguments": {"ErrorMessage": {"Std:Join": {
                "On": " ", "Values": ["test accuracy",
                                      {"Get": "Steps.Train.FinalMetricDataList['test accuracy'].Value"},
                                      "is below", {"Get": "Parameters.AccuracyThreshold"}]}}}}]}},
    ]
    if cache:
        for s in steps[:2]:
            s["CacheConfig"] = {"Enabled": True, "ExpireAfter": "P30D"}
    return {"Version": "2020-12-01", "Metadata": {},
            "Parameters": [{"Name": "AccuracyThreshold", "Type": "Float", "DefaultValue": 0.3},
                           {"Name": "TrainingData", "Type": "String", "DefaultValue": DATA_URI}],
            "Steps": steps}


def read_eval(store, record: dict) -> dict:
    """The toy job's evaluation.json, read back from output.tar.gz in the store."""
    model = record["Steps"]["Train"]["Properties"]["ModelArtifacts"]["S3ModelArtifacts"]
    with tarfile.open(store.path(model.rsplit("/", 1)[0] + "/output.tar.gz")) as tar:
        return json.load(tar.extractfile("evaluation.json"))


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("steps/*/Tune/trials/*"))
