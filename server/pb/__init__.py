"""Generated gRPC stubs of proto/polydecode/v1/generation.proto (`make proto`; do not edit)."""

from server.pb.polydecode.v1 import generation_pb2 as pb
from server.pb.polydecode.v1 import generation_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
