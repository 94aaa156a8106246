"""The names of the serving stages: the one place they are spelled.

A GenerateAndRetrieve call goes through them in this order; its response reports the time of
each (`timings`), and a deadline refusal names the stage before which work stopped.

    validate  the request checked against the model's schema and the limits (service)
    queue     waiting for the model's batch worker to take the request (batching)
    generate  the drawings, in a batch shared with concurrent requests (batching)
    embed     their vectors, same batch (batching)
    search    each drawing's nearest products in FAISS, same batch (batching)
    merge     the candidates of all drawings ranked into one list (service)
    encode    the drawings as PNG for the response (the gRPC servicer)

It imports nothing, so benchmarks and clients can name stages without loading torch.
"""

VALIDATE = "validate"
QUEUE = "queue"
GENERATE = "generate"
EMBED = "embed"
SEARCH = "search"
MERGE = "merge"
ENCODE = "encode"

# Every stage a served response times, in pipeline order.
ALL = (VALIDATE, QUEUE, GENERATE, EMBED, SEARCH, MERGE, ENCODE)
# What RetrievalService times (encode is the servicer's, after the service returns).
IN_PROCESS = ALL[:-1]
# The stages that compute, in order: what a refusal lists as "not run". Waiting in the queue
# is not work, so a request stopped there has not run generate and what follows.
WORK = (VALIDATE, GENERATE, EMBED, SEARCH, MERGE)
