"""A multi-turn chat: each turn's prompt repeats the system prompt and every earlier turn, answers included, and
the engine serves all of it from its KV cache; only the new question is computed.

    python examples/multi_turn.py
"""
from langchain_core.messages import HumanMessage, SystemMessage

from braid_langchain import ChatBraid

QUESTIONS = ["What is the capital of France?", "And the capital of Italy?", "Which of the two cities is larger?",
             "Name one famous museum in the larger one."]

if __name__ == "__main__":
    model = ChatBraid(temperature=0, max_tokens=48)
    history = [SystemMessage("You are a helpful assistant.")]
    for question in QUESTIONS:
        history.append(HumanMessage(question))
        reply = model.invoke(history)
        history.append(reply)
        usage = reply.usage_metadata
        cached = usage["input_token_details"]["cache_read"]
        print(f"> {question}\n{reply.content}\n  [prompt {usage['input_tokens']} tokens, {cached} from cache]\n")
