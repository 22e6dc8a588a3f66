"""Writes prompts_train.jsonl and prompts_eval.jsonl: requests for short reviews and opinions.

    python data/sentiment/make_prompts.py

Each subject gets one template, about a quarter of them two; subjects, not just prompts, are split between
train and eval, so the eval prompts ask about things the policy never saw in training. Phrasing is neutral: no
prompt asks for praise or for criticism. Deterministic (seed 0); the subjects and templates were written for
minrlhf.
"""
import json
import os
import random

SUBJECTS = {
    "film": ["the film Casablanca", "the movie Jaws", "a slow-paced French drama about a baker",
             "the film Spirited Away", "a low-budget zombie comedy", "the movie The Matrix",
             "a three-hour historical epic", "the film Singin' in the Rain",
             "a documentary about deep-sea fish", "the movie Jurassic Park", "a silent film from the 1920s",
             "the animated film Toy Story", "a remake of a classic western", "the movie Groundhog Day",
             "a horror film set in a lighthouse", "the film The Godfather",
             "a romantic comedy set in a bookshop", "the movie Paddington 2",
             "a science-fiction film about Mars", "the film Amelie",
             "a war film told from a nurse's point of view", "a superhero sequel"],
    "book": ["the novel Pride and Prejudice", "the book Moby-Dick", "a cookbook of one-pot dinners",
             "the novel Frankenstein", "a thriller you can read in one sitting", "the book The Hobbit",
             "a biography of a famous chemist", "the novel Jane Eyre", "a collection of short ghost stories",
             "the book Treasure Island", "a self-help book about sleep", "the novel Great Expectations",
             "a children's picture book about a lost sock", "the poetry of Emily Dickinson",
             "a travel memoir about walking across Spain", "the novel Dracula",
             "a popular-science book about bees", "the book Alice's Adventures in Wonderland",
             "a fantasy trilogy with a map in the front"],
    "food": ["a bowl of ramen from a noodle bar", "homemade lasagne", "a street taco",
             "dark chocolate with sea salt", "a croissant from a corner bakery", "vegetable curry",
             "blue cheese", "a plate of fish and chips", "sourdough bread", "pineapple on pizza",
             "a green smoothie", "a slice of carrot cake", "instant coffee", "oysters", "a vegan burger",
             "miso soup", "a pumpkin spice latte", "tofu stir-fry", "a bagel with cream cheese", "licorice",
             "mango sorbet", "a school cafeteria lunch"],
    "restaurant": ["a family-run Italian restaurant", "a fast-food drive-through",
                   "a sushi bar with a conveyor belt", "a rooftop cocktail bar", "a busy dim sum hall",
                   "a vegan cafe", "a roadside diner", "a steakhouse downtown",
                   "a food truck that sells dumplings", "a hotel breakfast buffet", "a tapas bar",
                   "a Michelin-starred tasting menu", "a pizza place near the station",
                   "a tea room that serves scones", "an all-you-can-eat buffet",
                   "a beach shack selling grilled fish", "a ramen shop with a long queue",
                   "a university canteen", "an airport food court"],
    "place": ["the city of Lisbon", "Venice", "a small fishing village", "the Grand Canyon", "New York City",
              "a national park in the rain", "Tokyo", "a quiet public library", "the London Underground",
              "Reykjavik", "a crowded theme park", "a botanical garden", "the city of Marrakesh",
              "a ski resort", "a local farmers' market", "Berlin", "a natural history museum",
              "a desert campsite", "the beaches of Portugal", "a shopping mall on a Saturday",
              "the Scottish Highlands", "Singapore"],
    "hotel": ["a budget hotel near the airport", "a beachfront resort",
              "a boutique hotel in an old townhouse", "a youth hostel", "a mountain lodge", "a capsule hotel",
              "a bed and breakfast in the countryside", "a five-star city hotel", "a motel by the highway",
              "a treehouse rental", "a cruise ship cabin", "a glamping tent", "a conference hotel",
              "a converted lighthouse you can rent"],
    "gadget": ["a pair of wireless earbuds", "a smartwatch", "an e-reader", "a robot vacuum cleaner",
               "a mechanical keyboard", "a budget smartphone", "a noise-cancelling headset",
               "a drone with a camera", "a smart speaker", "a portable power bank", "a tablet for drawing",
               "an instant camera", "a fitness tracker", "a virtual reality headset",
               "an electric toothbrush", "a 4K television", "a laptop stand", "a pair of smart glasses"],
    "product": ["a cast-iron frying pan", "a reusable water bottle", "a standing desk", "an electric kettle",
                "a memory-foam pillow", "a pair of running shoes", "a rain jacket", "a fountain pen",
                "a yoga mat", "a coffee grinder", "a houseplant that needs little light",
                "a backpack for travel", "a set of kitchen knives", "an air fryer", "a wool sweater",
                "a bicycle helmet", "a board game for families", "scented candles", "a folding umbrella"],
    "service": ["a food delivery service", "a local bus service", "a bank's customer support line",
                "a dentist's appointment", "a haircut at a barber shop", "an online grocery order",
                "a taxi ride at night", "a car repair garage", "a dry cleaner", "an internet provider",
                "a moving company", "a postal service", "a gym membership", "an airline's economy class",
                "a language tutoring session", "a library's e-book lending", "a bike-sharing scheme"],
    "app": ["a meditation app", "a language-learning app", "a weather app", "a note-taking app",
            "a photo editing app", "a budgeting app", "a podcast app", "a map and navigation app",
            "a recipe app", "a habit tracker", "a video calling app", "a music streaming service",
            "a to-do list app", "a password manager", "a social media app for short videos",
            "an online encyclopedia"],
    "game": ["the game Tetris", "chess", "a cooperative board game", "the video game Minecraft",
             "a mobile puzzle game", "a racing game", "the card game Uno", "a farming simulation game",
             "an escape room", "Monopoly", "a retro platform game", "a trivia night at a pub",
             "a crossword puzzle", "an online multiplayer shooter", "a jigsaw puzzle of 1000 pieces",
             "the game Pac-Man"],
    "music": ["the album Abbey Road", "a jazz trio in a small club", "a symphony orchestra concert",
              "a pop song on the radio", "Beethoven's Fifth Symphony", "a street musician playing violin",
              "a heavy metal album", "a playlist for studying", "a folk singer with a guitar",
              "an opera performance", "a karaoke night", "a music festival in a muddy field",
              "a piano sonata by Mozart", "a reggae record", "a school choir concert"],
    "event": ["a wedding reception", "a science fair", "a marathon", "a fireworks display",
              "a birthday party at a bowling alley", "a tech conference", "a book signing",
              "a community garden open day", "a comedy show", "a theatre production of Hamlet",
              "a football match in the rain", "a night market", "a charity bake sale",
              "an art exhibition of modern sculpture", "a job fair", "a summer camp for kids",
              "a circus performance"],
}
TEMPLATES = [
    "Write a one-sentence review of {}.", "What did you think of {}?", "Give your opinion of {}.",
    "Give your opinion of {} in a sentence or two.", "Review {} in one or two sentences.",
    "In two sentences, what is your take on {}?", "How would you describe {} to a friend? Keep it short.",
    "Share a short review of {}.", "What's your verdict on {}? Be brief.",
    "Tell me briefly how you feel about {}.", "Write a two-sentence review of {}.",
    "Sum up {} in one sentence.", "What is your impression of {}?",
    "Describe your experience of {} in a couple of sentences.",
    "Would you recommend {}? Answer in a sentence or two.", "Write a short review of {} for a blog.",
    "Briefly, what do you make of {}?", "What are your thoughts on {}?",
    "Rate {} and explain in one sentence.", "Write a quick review of {}.",
]
EVAL_SHARE = 0.2
SECOND_TEMPLATE = 0.27  # share of subjects asked about twice, to reach ~300 prompts


def prompts(seed=0):
    """(train, eval) lists of {"prompt"}: each category's subjects are shuffled and the last fifth held
    out."""
    rng, train, held_out = random.Random(seed), [], []
    for category in sorted(SUBJECTS):
        subjects = sorted(SUBJECTS[category])
        rng.shuffle(subjects)
        cut = round(len(subjects) * (1 - EVAL_SHARE))
        asked = [[{"prompt": t.format(s)}
                  for t in rng.sample(TEMPLATES, 1 + (rng.random() < SECOND_TEMPLATE))]
                 for s in subjects]
        train, held_out = train + sum(asked[:cut], []), held_out + sum(asked[cut:], [])
    rng.shuffle(train), rng.shuffle(held_out)
    return train, held_out


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    train, held_out = prompts()
    write(os.path.join(here, "prompts_train.jsonl"), train)
    write(os.path.join(here, "prompts_eval.jsonl"), held_out)
    print(f"{len(train)} train and {len(held_out)} eval prompts written to {here}")
