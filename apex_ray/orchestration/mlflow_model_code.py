"""The code of apex-ray's MLflow models (MLflow "models from code"): ``mlflow.pyfunc.load_model``
runs this file, which names the model class, instead of unpickling a pickled object (the logged
model holds no pickle: its weights are safetensors, its code this file and the apex-ray package).
"""
import mlflow

from apex_ray.orchestration.mlflow_model import ApexImageModel

mlflow.models.set_model(ApexImageModel())
