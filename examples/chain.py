"""The smallest LangChain pipeline on Braid: prompt | model | parser, invoked and streamed.

    python examples/chain.py
"""
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from braid_langchain import ChatBraid

prompt = ChatPromptTemplate.from_messages([
    ("system", "You are a concise assistant. Answer in one sentence."),
    ("human", "{question}"),
])
model = ChatBraid(temperature=0, max_tokens=48)  # the embedded SmolLM2-135M-Instruct; loads on first use
chain = prompt | model | StrOutputParser()

if __name__ == "__main__":
    print(chain.invoke({"question": "What is the capital of France?"}))
    for piece in chain.stream({"question": "Why is the sky blue?"}):
        print(piece, end="", flush=True)
    print()
