"""Twenty pydantic models of varied shape for `chat.completions.parse`, each with the prompt
it is asked with, and the get_weather tool. Every string has a max_length, every array a
max_length and every number bounds, so that a 135M model under a grammar mask ends its JSON
well inside max_tokens (greedy under xgrammar masks with HF transformers, each one ends in at
most ~110 tokens).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, NamedTuple

import openai
from pydantic import BaseModel, Field


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    is_student: bool


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)
    zip_code: str = Field(max_length=10)


class Contact(BaseModel):
    name: str = Field(max_length=20)
    address: Address


class Color(str, Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Paint(BaseModel):
    color: Color
    glossy: bool


class Weather(BaseModel):
    condition: Literal["sunny", "rainy", "cloudy", "snowy"]
    temperature_c: int = Field(ge=-50, le=60)


class ShoppingList(BaseModel):
    items: list[Annotated[str, Field(max_length=15)]] = Field(max_length=3)


class Book(BaseModel):
    title: str = Field(max_length=40)
    subtitle: str | None = Field(max_length=40)
    pages: int = Field(ge=1, le=2000)


class Rating(BaseModel):
    score: float = Field(ge=0, le=5)
    comment: str = Field(max_length=40)


class Member(BaseModel):
    name: str = Field(max_length=20)
    role: Literal["lead", "engineer", "designer"]


class Team(BaseModel):
    name: str = Field(max_length=20)
    members: list[Member] = Field(max_length=3)


class Switches(BaseModel):
    wifi: bool
    bluetooth: bool
    airplane_mode: bool


class Company(BaseModel):
    name: str = Field(max_length=30)
    ceo: Person
    headquarters: Address


class Size(str, Enum):
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


class Order(BaseModel):
    size: Size
    status: Literal["pending", "shipped", "delivered"]
    quantity: int = Field(ge=1, le=10)


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Event(BaseModel):
    title: str = Field(max_length=30)
    year: int = Field(ge=1900, le=2100)
    month: int = Field(ge=1, le=12)
    day: int = Field(ge=1, le=31)


class Owner(BaseModel):
    name: str = Field(max_length=20)


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["dog", "cat", "bird", "fish"]
    owner: Owner | None


class Scores(BaseModel):
    values: list[Annotated[int, Field(ge=0, le=100)]] = Field(max_length=5)


class Ingredient(BaseModel):
    name: str = Field(max_length=20)
    quantity: int = Field(ge=0, le=1000)
    unit: Literal["g", "ml", "piece"]


class Recipe(BaseModel):
    name: str = Field(max_length=30)
    ingredients: list[Ingredient] = Field(max_length=3)
    vegetarian: bool


class Genre(str, Enum):
    DRAMA = "drama"
    COMEDY = "comedy"
    ACTION = "action"


class Movie(BaseModel):
    title: str = Field(max_length=30)
    genre: Genre
    rating: float = Field(ge=0, le=10)
    tags: list[Annotated[str, Field(max_length=12)]] = Field(max_length=2)


class Answer(BaseModel):
    answer: Literal["yes", "no"]
    confidence: float = Field(ge=0, le=1)


class Product(BaseModel):
    name: str = Field(max_length=30)
    price: float = Field(ge=0, le=10000)
    in_stock: bool
    category: Literal["books", "toys", "food"] | None


class Setting(BaseModel):
    key: str = Field(max_length=20)
    value: int | bool


class Case(NamedTuple):
    model: type[BaseModel]
    prompt: str


CASES = [
    Case(Person, "Describe a 21 year old student called Alice as JSON."),
    Case(Contact, "Give the contact details of Bob, who lives in Paris, as JSON."),
    Case(Paint, "Which paint colour is the sky? Answer as JSON."),
    Case(Weather, "What is the weather like in London today? Answer as JSON."),
    Case(ShoppingList, "Write a short shopping list for breakfast as JSON."),
    Case(Book, "Describe a famous novel as JSON."),
    Case(Rating, "Rate the movie Titanic out of 5 as JSON."),
    Case(Team, "Describe a small software team as JSON."),
    Case(Switches, "Which phone settings are on during a flight? Answer as JSON."),
    Case(Company, "Describe a technology company as JSON."),
    Case(Order, "A customer ordered two large pizzas. Give the order as JSON."),
    Case(Point, "Give the coordinates of a point on a map as JSON."),
    Case(Event, "When did the first moon landing happen? Answer as JSON."),
    Case(Pet, "Describe a pet dog called Rex as JSON."),
    Case(Scores, "List a few test scores out of 100 as JSON."),
    Case(Recipe, "Give a simple pancake recipe as JSON."),
    Case(Movie, "Describe a famous action movie as JSON."),
    Case(Answer, "Is the earth round? Answer as JSON."),
    Case(Product, "Describe a children's toy for sale as JSON."),
    Case(Setting, "Give one configuration setting as JSON."),
]


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=20, description="The city name")
    unit: Literal["celsius", "fahrenheit"]


# the openai client's own helper: a strict function tool whose arguments parse as GetWeather
WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")
