"""Seeded synthetic data: a realistic diabetes peer-support program, for demos, tests and benchmarks.

The program follows the model of peer support in diabetes described by Brownson & Heisler (2009): peer
supporters (promotoras, community health workers, peer coaches, leaders and mentors) give emotional,
instrumental, educational and skills support, do outreach and care coordination, and link participants to
community resources; contacts may record the six essential elements of self-management support, and goals
cover the seven ADCES7 self-care behaviours.

Everything is made up: names, MRNs ("MRN" + 7 digits), phone numbers (555-01xx) and notes. Only the standard
library's ``random.Random(seed)`` is used, so the same seed gives byte-identical files on every machine.

Contacts are *streamed* to disk: each participant's contacts come from a small generator, and the CSV /
REDCap writers write each row as it is made, so ``contacts=5_000_000`` needs no more memory than the default
demo (memory grows with participants, goals and referrals, never with contacts). The Excel writer streams
rows too (openpyxl write-only mode), but openpyxl keeps the workbook's shared-strings table in memory, so
use CSV for multi-million-row benchmarks.

Three output formats carry the same program content (same seed -> same participants, goals, contacts...):

* ``template``: the peersync CSV template, one file per record kind (``mappings/peersync-template``);
* ``xlsx``: the same, as one workbook with one sheet per kind (real Excel dates);
* ``redcap``: a REDCap-style flat export (``PeerSupport_DATA.csv`` with repeating instruments, numeric codes
  and checkbox columns) plus a staff roster (``staff.csv``), read by ``mappings/redcap-example``.

Each run also writes ``clinic/patients.json`` (the clinic EHR's existing Patients, as a FHIR transaction
Bundle) and ``summary.json`` (a :class:`GenerationSummary`: counts per kind, the deliberate bad rows and the
participants the sync must send to review).

Command line: ``python -m tests.demogen --help``.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import heapq
import io
import json
import os
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from itertools import accumulate
from pathlib import Path
from random import Random
from typing import Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

from connector.model import (
    Behavior,
    Comparator,
    ContactMode,
    ContactOutcome,
    ContactSetting,
    EnrollmentStatus,
    EssentialElement,
    GoalAchievement,
    GoalLifecycle,
    GoalSetBy,
    NeedCategory,
    PlannedStatus,
    RecordKind,
    ReferralStatus,
    SupporterTitle,
    SupportType,
    TargetMeasure,
)

Format = Literal["template", "redcap", "xlsx"]

TIMEZONE = "America/Chicago"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"
DEFAULT_SEED = 20260101
DEFAULT_START = date(2026, 3, 2)
_ZONE = ZoneInfo(TIMEZONE)
_RNG_NAMESPACE = "peersync-demo"
# Fixed timestamps inside generated workbooks, so they are byte-identical run to run.
_XLSX_TIMESTAMP = "2026-01-01T00:00:00Z"

KINDS: tuple[str, ...] = tuple(k.value for k in RecordKind)

# -- the peersync template: file, sheet and column names (authoritative: mappings/peersync-template) ---------

TEMPLATE_FILES: dict[str, str] = {
    "supporter": "supporters.csv",
    "enrollment": "enrollments.csv",
    "goal": "goals.csv",
    "goal_note": "goal_notes.csv",
    "contact": "contacts.csv",
    "referral": "referrals.csv",
    "planned_contact": "planned_contacts.csv",
}
TEMPLATE_SHEETS: dict[str, str] = {
    "supporter": "Supporters",
    "enrollment": "Enrollments",
    "goal": "Goals",
    "goal_note": "GoalNotes",
    "contact": "Contacts",
    "referral": "Referrals",
    "planned_contact": "PlannedContacts",
}
TEMPLATE_COLUMNS: dict[str, list[str]] = {
    "supporter": ["staff_id", "given_name", "family_name", "title", "organization", "phone", "email", "npi", "active"],
    "enrollment": ["enrollment_id", "participant_id", "mrn", "start_date", "end_date", "status", "supporter_id",
                   "conditions", "clinic_referral", "clinical_consent"],
    "goal": ["goal_id", "enrollment_id", "goal_in_own_words", "behavior", "target_measure", "target_comparator",
             "target_value", "target_unit", "start_date", "due_date", "lifecycle_status", "achievement_status",
             "status_date", "outcome_observation", "set_by", "supporter_id", "void"],
    "goal_note": ["note_id", "goal_id", "date", "supporter_id", "note"],
    "contact": ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "duration_minutes", "mode",
                "setting", "outcome", "support_types", "essential_elements", "goal_ids", "notes",
                "group_session_id", "planned_contact_id", "void"],
    "referral": ["referral_id", "enrollment_id", "supporter_id", "resource_name", "resource_id", "need",
                 "referral_date", "status", "status_date", "outcome_notes", "void"],
    "planned_contact": ["planned_contact_id", "enrollment_id", "supporter_id", "due_datetime", "mode", "status",
                        "void"],
}
XLSX_FILE = "peersync-program.xlsx"

# -- the REDCap-style export (read by mappings/redcap-example) -----------------------------------------------

REDCAP_DATA_FILE = "PeerSupport_DATA.csv"
REDCAP_STAFF_FILE = "staff.csv"
REDCAP_STAFF_COLUMNS = ["staff_id", "first_name", "last_name", "role", "site", "phone", "email", "active"]
# Repeating instrument names, per record kind (the enrollment form is the record's non-repeating form).
REDCAP_INSTRUMENTS: dict[str, str] = {
    "goal": "goal",
    "goal_note": "goal_note",
    "contact": "peer_contact",
    "referral": "referral",
    "planned_contact": "next_contact",
}
# REDCap numeric choice codes: the 1-based position in these lists.
REDCAP_CHOICES: dict[str, list[str]] = {
    "enroll_status": [e.value for e in EnrollmentStatus],
    "contact_mode": [e.value for e in ContactMode],
    "contact_setting": [e.value for e in ContactSetting],
    "contact_outcome": [e.value for e in ContactOutcome],
    "goal_behavior": [e.value for e in Behavior],
    "goal_measure": [e.value for e in TargetMeasure],
    "goal_comparator": [e.value for e in Comparator],
    "goal_status": [e.value for e in GoalLifecycle],
    "goal_achievement": [e.value for e in GoalAchievement],
    "goal_set_by": [e.value for e in GoalSetBy],
    "ref_need": [e.value for e in NeedCategory],
    "ref_status": [e.value for e in ReferralStatus],
    "next_mode": [e.value for e in ContactMode],
    "next_status": [e.value for e in PlannedStatus],
}
# Checkbox fields: column suffix N (1-based) -> code.
REDCAP_SUPPORT_CHECKBOXES = [s.value for s in SupportType if s is not SupportType.OTHER]  # support___1..9
REDCAP_ELEMENT_CHECKBOXES = [e.value for e in EssentialElement]  # elements___1..6
CONDITIONS = ["E11.9", "E11.65", "I10", "E78.5", "E66.9"]  # ICD-10-CM; REDCap dx___1..5
REDCAP_COLUMNS: list[str] = [
    "record_id", "redcap_repeat_instrument", "redcap_repeat_instance",
    # enrollment (non-repeating)
    "participant_id", "mrn", "enroll_date", "enroll_supporter", "enroll_status", "enroll_end_date",
    *[f"dx___{i}" for i in range(1, len(CONDITIONS) + 1)], "enrollment_complete",
    # goal
    "goal_text", "goal_behavior", "goal_measure", "goal_comparator", "goal_target", "goal_unit", "goal_start",
    "goal_due", "goal_status", "goal_achievement", "goal_set_by", "goal_staff", "goal_complete",
    # goal_note
    "note_goal_instance", "note_date", "note_staff", "note_text", "goal_note_complete",
    # peer_contact
    "contact_datetime", "contact_staff", "contact_mode", "contact_setting", "contact_duration", "contact_outcome",
    *[f"support___{i}" for i in range(1, len(REDCAP_SUPPORT_CHECKBOXES) + 1)],
    *[f"elements___{i}" for i in range(1, len(REDCAP_ELEMENT_CHECKBOXES) + 1)],
    "contact_goal_ids", "contact_group_id", "contact_next_instance", "contact_notes", "contact_void",
    "peer_contact_complete",
    # referral
    "ref_date", "ref_staff", "ref_resource", "ref_resource_id", "ref_need", "ref_status", "ref_outcome",
    "referral_complete",
    # next_contact
    "next_due", "next_mode", "next_staff", "next_status", "next_contact_complete",
]


def redcap_code(field_name: str, code: str) -> str:
    """The REDCap numeric choice code of a canonical code, e.g. ('contact_mode', 'telephone') -> '2'."""
    return str(REDCAP_CHOICES[field_name].index(code) + 1)


# -- content banks ---------------------------------------------------------------------------------------------

# (title as the program writes it, given, family, languages, organization)
_STAFF = [
    ("Promotora", "María Elena", "Torres", ("es", "en"), "Iglesia San José Health Ministry"),
    ("CHW", "Luis", "Ramírez", ("es", "en"), "Eastside Community Health Center"),
    ("Peer Coach", "Denise", "Washington", ("en",), "Eastside Community Health Center"),
    ("peer leader", "Rosa", "Delgado", ("es", "en"), "Iglesia San José Health Ministry"),
    ("Community Health Worker", "James", "Whitfield", ("en",), "Westside Family Clinic"),
    ("Peer Mentor", "Patricia", "Okafor", ("en",), "Westside Family Clinic"),
]
_GROUP_LEADER_TITLES = {"Promotora", "peer leader", "Peer Coach"}
_GIVEN = {
    ("es", "female"): ["María", "Guadalupe", "Rosa", "Carmen", "Ana", "Leticia", "Silvia", "Juana", "Verónica",
                       "Martha", "Teresa", "Alicia", "Yolanda", "Irma"],
    ("es", "male"): ["José", "Juan", "Luis", "Carlos", "Jorge", "Miguel", "Francisco", "Ramón", "Alejandro",
                     "Ricardo", "Arturo", "Raúl"],
    ("en", "female"): ["Linda", "Barbara", "Gloria", "Sharon", "Tanya", "Denise", "Brenda", "Angela", "Karen",
                       "Monique", "Deborah", "Yvonne"],
    ("en", "male"): ["James", "Robert", "Michael", "William", "Darnell", "Kevin", "Gary", "Terrence", "Dennis",
                     "Anthony", "Curtis", "Leon"],
}
_FAMILY = {
    "es": ["García", "Hernández", "López", "Martínez", "Rodríguez", "González", "Pérez", "Sánchez", "Ramírez",
           "Flores", "Cruz", "Morales", "Reyes", "Jiménez", "Vargas", "Castillo", "Ortiz", "Mendoza"],
    "en": ["Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson", "Thomas", "Jackson",
           "White", "Harris", "Martin", "Thompson", "Robinson", "Lewis", "Walker", "Young"],
}

# Goals in the participant's own words: behaviour -> [(English, Spanish, target)], target =
# (measure, comparator, value, unit) with value None meaning "personal" (a body weight).
_GOALS: dict[str, list[tuple[str, str, tuple[str, str, str | None, str] | None]]] = {
    "healthy-eating": [
        ("Drink water instead of soda with lunch and dinner", "Tomar agua en vez de refresco en la comida y la cena",
         None),
        ("Fill half my plate with vegetables at dinner", "Llenar la mitad del plato con verduras en la cena", None),
        ("Cook at home at least 4 nights a week", "Cocinar en casa por lo menos 4 noches a la semana", None),
        ("Lose some weight so my knees hurt less", "Bajar de peso para que no me duelan las rodillas",
         ("body-weight", "<=", None, "kg")),
        ('Stop "cheating" on the weekends, just one treat', 'Ya no "hacer trampa" el fin de semana, solo un postre',
         None),
        ("Only 2 tortillas per meal", "Comer solo 2 tortillas por comida", None),
    ],
    "being-active": [
        ("Walk after dinner with my granddaughter, work up to 7000 steps a day",
         "Caminar después de la cena con mi nieta, llegar a 7000 pasos al día",
         ("steps-per-day", ">=", "7000", "/d")),
        ("Get 150 minutes of activity a week, walking or the Zumba class",
         "Hacer 150 minutos de ejercicio a la semana, caminar o la clase de zumba",
         ("activity-minutes-per-week", ">=", "150", "min/wk")),
        ("Be active 5 days a week, even if it's just 20 minutes", "Moverme 5 días a la semana aunque sea 20 minutos",
         ("active-days-per-week", ">=", "5", "d/wk")),
        ("Do the chair exercises from the video 3 times a week", "Hacer los ejercicios en la silla 3 veces por semana",
         None),
    ],
    "taking-medication": [
        ("Take my metformin every day with breakfast", "Tomar la metformina todos los días con el desayuno", None),
        ("Not run out of insulin, refill before the last pen",
         "No quedarme sin insulina, surtir antes de la última pluma", None),
        ("Use the pill box my daughter bought me, every Sunday", "Llenar el pastillero cada domingo", None),
    ],
    "monitoring": [
        ("Check my sugar every morning before breakfast and keep it under 130",
         "Checar el azúcar cada mañana en ayunas, que salga menos de 130", ("fasting-glucose", "<", "130", "mg/dL")),
        ("Get my A1c under 7", "Bajar mi A1c a menos de 7", ("hba1c", "<", "7", "%")),
        ("Write my numbers in the log and bring it to my appointment", "Apuntar mis números y llevarlos a la cita",
         None),
    ],
    "reducing-risks": [
        ("Get my eye exam done this year", "Hacerme el examen de los ojos este año", None),
        ("Check my feet every night before bed", "Revisarme los pies cada noche antes de dormir", None),
        ("Cut down to half a pack a day", "Fumar menos, medio paquete al día", None),
        ("Get my A1c under 7 so I don't end up on dialysis like my brother",
         "Bajar mi A1c a menos de 7 para no terminar en diálisis como mi hermano", ("hba1c", "<", "7", "%")),
    ],
    "healthy-coping": [
        ("Call my sister when I feel stressed, instead of eating",
         "Llamar a mi hermana cuando me sienta estresada, en vez de comer", None),
        ("Go to the support group at church every month", "Ir al grupo de apoyo de la iglesia cada mes", None),
        ("Take 10 minutes to breathe and pray when I get overwhelmed",
         "Tomar 10 minutos para respirar y rezar cuando me sienta agobiada", None),
    ],
    "problem-solving": [
        ("Have a plan for low sugar at work, keep juice in my locker",
         "Tener un plan para cuando me baje el azúcar en el trabajo", None),
        ("Figure out how to pay for my test strips", "Ver cómo pagar las tiras reactivas", None),
        ("Plan meals ahead for the weeks I work nights", "Planear las comidas para las semanas que trabajo de noche",
         None),
    ],
}
_BEHAVIOR_WEIGHTS = {"healthy-eating": 24, "being-active": 22, "taking-medication": 12, "monitoring": 14,
                     "reducing-risks": 10, "healthy-coping": 10, "problem-solving": 8}
_GOAL_NOTES = {
    "en": {
        "healthy-eating": ["Down to one soda a day, says water with lemon helps.", "Tried the plate method 3 nights.",
                           "Weekends still hard, birthday party last Saturday."],
        "being-active": ["Walked 4 of 7 days this week.", "Step counter says 5,900 average, up from 3,000.",
                         "Knee pain, switched to the chair exercises for now."],
        "taking-medication": ["No missed doses this week.", "Refilled insulin on time this month.",
                              "Missed 2 mornings, pill box is helping."],
        "monitoring": ["Log shows fasting 120-145.", "A1c came back 7.4, down from 8.1!",
                       "Checking 5 days a week now."],
        "reducing-risks": ["Eye exam scheduled.", "Feet look good, no sores.", "Cut down to 8 cigarettes a day."],
        "healthy-coping": ["Went to the group twice.", "Called her sister instead of snacking, twice this week."],
        "problem-solving": ["Keeps juice and crackers in the locker now.", "Found a pharmacy with cheaper strips."],
    },
    "es": {
        "healthy-eating": ["Ya solo toma un refresco al día.", "Usó el método del plato 3 noches."],
        "being-active": ["Caminó 3 días esta semana.", "Su podómetro marca 6,200 pasos en promedio."],
        "taking-medication": ["No ha faltado ninguna dosis.", "Surtió la insulina a tiempo."],
        "monitoring": ["Azúcar en ayunas entre 118 y 140.", "Su A1c bajó a 7.3."],
        "reducing-risks": ["Ya tiene cita para los ojos.", "Se revisa los pies todas las noches."],
        "healthy-coping": ["Fue al grupo de la iglesia.", "Dice que respirar le ayuda cuando se enoja."],
        "problem-solving": ["Ya trae jugo en la bolsa.", "Encontró farmacia con tiras más baratas."],
    },
}
_NOTES = {
    "en": {
        "emotional": ["Talked about feeling overwhelmed with the diagnosis. Mostly listened.",
                      "Feeling down since losing hours at work. Listened, talked about what helps.\n"
                      "Will check in Friday.",
                      'Said "I\'m tired of pricking my finger all the time." Talked about why the numbers matter.',
                      "Stress at home, mother is sick. Practiced the breathing exercise together.",
                      "Good spirits today, proud of the walking."],
        "instrumental": ["Dropped off a glucose log book and a pill organizer.",
                         "Helped fill out the pantry application, bring ID and a utility bill.",
                         "Went to the food pantry together, signed up for the monthly box."],
        "education": ["Went over the plate method, wants to try it this week.",
                      "Reviewed what an A1c is and what the last one means.",
                      "Read food labels together: carbs, serving size, added sugar.",
                      "Explained low blood sugar signs and the rule of 15."],
        "skills-training": ["Practiced with the new meter, did a fingerstick together, 142.",
                            "Walked through the grocery store, compared cereals and bread.",
                            "Practiced checking feet with a mirror."],
        "follow-up": ["Checked in on the walking goal, 4 days this week.",
                      "Reviewed glucose log; fasting mostly in the 140s. Talked about the evening snack.",
                      "Confirmed the metformin refill was picked up, no stomach problems now.",
                      "Follow-up on the referral, still waiting for a call back."],
        "outreach": ["Called to set up the next visit.", "Reminder call about the group on Thursday."],
        "care-coordination": ["Called the clinic together, moved the lab draw to a morning slot.",
                              "Let the nurse know about the low readings at night, nurse will call back.",
                              "Helped get the eye doctor referral sent."],
        "community-linkage": ["Gave info on the YMCA program, Tuesday/Thursday 6pm class.",
                              "Connected to the senior center lunch program."],
        "clinical-access-assistance": ["Helped schedule the eye exam, appt on the 14th.",
                                       "Set up a ride for the doctor's appointment on Monday.",
                                       "Helped sign in to the patient portal, can see lab results now."],
        "not-reached": ["No answer, left voicemail.", "Number disconnected, will try the daughter's number.",
                        "No reply.", "Knocked, nobody home. Left a flyer on the door."],
        "cancelled": ["Cancelled, sick kid.", "Rescheduled, work shift changed.",
                      "Cancelled, no ride. Offered a phone call instead."],
        "text-message": ["Sent reminder about Thursday group.",
                         "Texted encouragement, replied with step count: 6,200.",
                         "Sent the link for the recipe video."],
        "email": ["Emailed the YMCA class schedule and flyer.", "Sent the pantry hours and address by email."],
        "intake": ["First visit. Went over the program, what a peer supporter does, main worries.",
                   "Intake: talked about diabetes story, family, what to work on first.\nWants help with eating."],
    },
    "es": {
        "emotional": ["Platicamos del estrés en casa, dice que come más cuando está nerviosa.",
                      "Se siente triste por su diagnóstico, la escuché.\nLa llamo el viernes.",
                      'Dijo "ya me cansé de picarme el dedo". Hablamos de por qué sirve checarse.'],
        "instrumental": ["Le llevé un pastillero y una libreta para apuntar el azúcar.",
                         "Le ayudé a llenar la solicitud de la despensa."],
        "education": ["Revisamos el método del plato.", "Le expliqué qué es la A1c.",
                      "Leímos etiquetas juntos: carbohidratos, porción, azúcar."],
        "skills-training": ["Practicamos con el glucómetro nuevo, salió 138.", "Practicamos revisarse los pies."],
        "follow-up": ["Revisamos su registro de glucosa, en ayunas 130-150.",
                      'Dijo "ya no tomo refresco", solo agua de jamaica sin azúcar.',
                      "Seguimiento de la meta de caminar, 3 días esta semana."],
        "outreach": ["Llamé para hacer la próxima cita.", "Recordatorio del grupo del jueves."],
        "care-coordination": ["Hablé con la enfermera sobre sus azúcares bajos en la noche.",
                              "Cambiamos la cita de laboratorio a la mañana."],
        "community-linkage": ["Le di información de la despensa de la iglesia.",
                              "Le di el horario de la clase de zumba."],
        "clinical-access-assistance": ["Le ayudé a sacar cita con el doctor, 3 de mayo.",
                                       "Le conseguí transporte para la cita del lunes."],
        "not-reached": ["No contestó, dejé mensaje.", "No contestó. Intentar otra vez el lunes.",
                        "Le mandé mensaje, no respondió."],
        "cancelled": ["Canceló, no tenía transporte.", "Se reprogramó, cambió su horario de trabajo."],
        "text-message": ["Le mandé recordatorio de la cita.", "Mensaje de ánimo, respondió con sus pasos: 5,800."],
        "email": ["Le mandé por correo el horario de la clase."],
        "intake": ["Primera visita. Le expliqué el programa; platicamos de su diabetes y su familia.",
                   "Primera visita.\nQuiere ayuda con la comida y con caminar."],
    },
}
_GROUP_TOPICS = [
    ("Group session: portion sizes and the plate method.", "Sesión de grupo: porciones y el método del plato.",
     ["education", "skills-training"]),
    ("Group session: stress and diabetes, breathing exercise.", "Sesión de grupo: estrés y diabetes, respiración.",
     ["emotional", "education"]),
    ("Group walk and talk about staying active.", "Caminata en grupo; platicamos de mantenerse activos.",
     ["skills-training", "emotional"]),
    ("Group session: reading food labels, brought cans from home.", "Sesión de grupo: leer etiquetas.",
     ["education", "skills-training"]),
    ("Group session: medicines, questions for the doctor.", "Sesión de grupo: medicinas y preguntas para el doctor.",
     ["education", "care-coordination"]),
    ("Group session: holidays and eating, sharing recipes.", "Sesión de grupo: recetas saludables.",
     ["education", "emotional"]),
]
# (name, directory id or "", need)
_RESOURCES = [
    ("Eastside Community Food Pantry", "RD-101", "food"),
    ("SNAP application help", "RD-103", "food"),
    ("YMCA Diabetes Prevention Program", "RD-204", "physical-activity"),
    ("Walk with Ease group, park district", "RD-207", "physical-activity"),
    ("Medicaid ride line (non-emergency transport)", "RD-310", "transportation"),
    ("Reduced-fare transit card", "RD-311", "transportation"),
    ("County housing authority, application help", "RD-402", "housing"),
    ("Emergency rental assistance", "RD-405", "housing"),
    ("Diabetes support group, Iglesia San José", "RD-501", "social-connection"),
    ("Senior center lunch and social program", "", "social-connection"),
    ("Community mental health center counseling", "RD-601", "stress"),
    ("Prescription assistance program", "RD-701", "medication-access"),
    ("Utility bill assistance (LIHEAP)", "RD-801", "financial"),
    ("Free tax preparation (VITA)", "", "financial"),
    ("Legal aid clinic", "RD-901", "other"),
]
_NEED_WEIGHTS = {"food": 26, "physical-activity": 18, "transportation": 14, "housing": 8, "social-connection": 12,
                 "stress": 8, "medication-access": 8, "financial": 5, "other": 1}
_REFERRAL_OUTCOMES = {
    "completed": ["Picked up the first box.", "Enrolled, goes to the Tuesday 6pm class.", "Card received.",
                  "Se inscribió en el programa."],
    "accepted": ["Intake appointment next week.", "On the list, waiting for a start date."],
    "participant-declined": ["Declined, no childcare in the evenings.", "Not interested right now.",
                             "No le interesa por ahora."],
    "cancelled": ["Program full until fall.", "Moved out of the service area."],
    "made": [""],
}

# Alias spellings used in a few template rows (each is in the peersync-template profile's code tables).
TEMPLATE_ALIASES: dict[str, dict[str, list[str]]] = {
    "mode": {"telephone": ["Tel", "phone", "llamada"], "face-to-face": ["en persona", "in person", "F2F"],
             "text-message": ["text", "sms"], "video": ["zoom", "videollamada"], "email": ["e-mail", "correo"]},
    "outcome": {"completed": ["done", "completado"], "not-reached": ["no answer", "no contestó", "attempted"],
                "cancelled": ["canceled", "cancelado"]},
    "setting": {"home": ["casa", "home visit"], "community-site": ["centro comunitario", "community center"],
                "clinic": ["clínica"], "faith-based": ["iglesia", "church"], "remote": ["virtual"]},
    "support_types": {"follow-up": ["seguimiento", "follow up"], "emotional": ["apoyo emocional"],
                      "education": ["educación"], "community-linkage": ["referral"]},
}
# Free-text settings the template profile maps to "other" (unknown: other keeps the text).
_OTHER_SETTINGS = ["other", "other", "grocery store", "library", "laundromat"]

_SUPPORT_WEIGHTS = {
    # mode/setting context -> support type weights
    "home": {"emotional": 22, "follow-up": 18, "education": 16, "skills-training": 16, "instrumental": 10,
             "care-coordination": 6, "community-linkage": 6, "clinical-access-assistance": 6},
    "clinic": {"care-coordination": 25, "clinical-access-assistance": 25, "education": 15, "follow-up": 15,
               "emotional": 10, "skills-training": 10},
    "community": {"education": 22, "skills-training": 20, "emotional": 16, "community-linkage": 14,
                  "instrumental": 10, "follow-up": 10, "outreach": 8},
    "remote": {"follow-up": 30, "emotional": 22, "education": 12, "outreach": 10, "care-coordination": 8,
               "clinical-access-assistance": 8, "community-linkage": 6, "instrumental": 4},
}
_SLOTS_PER_DAY = 120  # 09:00 .. 18:55 in 5-minute steps
_DAY_START = time(9, 0)


# -- summary ---------------------------------------------------------------------------------------------------


@dataclass
class BadRow:
    """One deliberately bad row and why the profile must reject it."""

    kind: str
    problem: str
    file: str
    row: int  # spreadsheet-style row number (header = 1), as the rejects report shows it
    record_id: str
    expected_field: str


@dataclass
class GenerationSummary:
    """What :func:`generate_program` wrote. ``counts`` are the rows ``read_program`` must accept per kind."""

    fmt: str
    seed: int
    start: str
    as_of: str
    months: int
    counts: dict[str, int]
    rows: dict[str, int]
    expected_rejects: int
    expected_rejects_by_kind: dict[str, int]
    unmatched_enrollments: list[str]
    ambiguous_enrollments: list[str]
    files: list[str]
    bad_rows: list[BadRow] = field(default_factory=list)
    voided_contacts: int = 0
    group_sessions: int = 0
    group_contacts: int = 0
    contacts_fulfilling_plans: int = 0
    patients: int = 0

    @property
    def total_rows(self) -> int:
        """Every data row written (read_program must read exactly this many)."""
        return sum(self.rows.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (what summary.json holds)."""
        return asdict(self)


# -- internal content model ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Staff:
    staff_id: str
    given: str
    family: str
    title_text: str
    langs: tuple[str, ...]
    organization: str
    phone: str
    email: str


@dataclass(slots=True)
class _Goal:
    local: int  # 0-based index among the participant's goals (REDCap instance - 1)
    seq: int  # 1-based global number (template id G0001)
    behavior: str
    text: str
    target: tuple[str, str, str, str] | None
    start: date
    due: date | None
    lifecycle: str
    achievement: str | None
    set_by: str
    supporter: str | None
    bad: bool = False  # target value without a measure (rejected)
    notes: list[tuple[int, int, date, str, str | None]] = field(default_factory=list)  # (seq, local, date, text, sid)


@dataclass(slots=True)
class _Referral:
    local: int
    seq: int
    resource: str
    resource_id: str
    need: str
    on: date
    status: str
    outcome: str
    supporter: str | None


@dataclass(slots=True)
class _Plan:
    local: int
    seq: int
    due: datetime
    mode: str
    status: str
    supporter: str | None


@dataclass(slots=True)
class _Fixed:
    """A contact fixed in advance: a group session attendance or the contact that fulfils a plan."""

    when: datetime
    group: _Session | None = None
    plan: _Plan | None = None


@dataclass(slots=True)
class _Session:
    session_id: str
    when: datetime
    setting: str
    leader: _Staff
    duration: int
    topic: tuple[str, str, list[str]]


@dataclass(slots=True)
class _Person:
    index: int
    enrollment_id: str
    participant_id: str
    mrn: str
    lang: str
    gender: str
    given: str
    family: str
    birth: date
    start: date
    end: date | None
    last_day: date
    status: str
    supporter: _Staff
    conditions: list[str]
    mode_bias: str
    rate: float
    goals: list[_Goal] = field(default_factory=list)
    referrals: list[_Referral] = field(default_factory=list)
    plans: list[_Plan] = field(default_factory=list)
    fixed: list[_Fixed] = field(default_factory=list)
    n_filler: int = 0
    voids: frozenset[int] = frozenset()
    bad_contacts: list[_Contact] = field(default_factory=list)

    @property
    def n_valid_contacts(self) -> int:
        return self.n_filler + len(self.fixed)


@dataclass(slots=True)
class _Contact:
    person: _Person | None  # None for the contact that names an unknown enrollment
    enrollment_id: str
    instance: int  # 1-based, per participant (REDCap redcap_repeat_instance)
    staff: _Staff
    when: datetime
    mode: str
    outcome: str
    setting: str | None = None
    duration: int | None = None
    supports: list[str] = field(default_factory=list)
    elements: list[str] = field(default_factory=list)  # explicit only; empty = left to element_rules
    goals: list[_Goal] = field(default_factory=list)
    notes: str = ""
    session: _Session | None = None
    plan: _Plan | None = None
    void: bool = False
    offset: bool = False  # write the date-time with an explicit UTC offset (template only)
    aliases: dict[str, str] = field(default_factory=dict)  # field -> spelling as written (template only)
    setting_text: str | None = None  # free text that the profile maps to "other"
    problem: str | None = None  # bad-row kind
    raw_when: str | None = None  # unparseable date-time text
    raw_mode: dict[str, str] | None = None  # unknown mode per format
    dup: int = 0  # 1, 2 for the two rows of a duplicated id


@dataclass
class _Program:
    seed: int
    start: date
    as_of: date
    months: int
    staff: list[_Staff]
    persons: list[_Person]
    sessions: list[_Session]
    unmatched: list[_Person]
    ambiguous: list[_Person]
    bad_enrollment: _Person | None
    orphan_contacts: list[_Contact]


def _rng(seed: int, *parts: object) -> Random:
    # A str seed is hashed with SHA-512 by Random: stable across runs, machines and PYTHONHASHSEED.
    return Random("/".join([_RNG_NAMESPACE, str(seed), *map(str, parts)]))


def _pick(rng: Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class _Weights:
    """A fixed weighted choice, precomputed for the per-contact hot path (same draws as :func:`_pick`)."""

    __slots__ = ("cumulative", "total", "values")

    def __init__(self, weights: dict[str, float]) -> None:
        self.values = list(weights)
        self.cumulative = list(accumulate(weights.values()))
        self.total = self.cumulative[-1]

    def pick(self, rng: Random) -> str:
        return self.values[bisect.bisect(self.cumulative, rng.random() * self.total, 0, len(self.values) - 1)]


def _sample_weighted(rng: Random, weights: dict[str, float], k: int) -> list[str]:
    pool = dict(weights)
    chosen = []
    for _ in range(min(k, len(pool))):
        value = _pick(rng, pool)
        chosen.append(value)
        del pool[value]
    return chosen


def _add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    year, month = day.year + month // 12, month % 12 + 1
    last = [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28, 31, 30, 31, 30, 31, 31, 30, 31,
            30, 31][month - 1]
    return date(year, month, min(day.day, last))


def _weekday_on_or_after(day: date) -> date:
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day


def _weekday_on_or_before(day: date) -> date:
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def _count_workdays(first: date, last: date) -> int:
    days = (last - first).days + 1
    if days <= 0:
        return 0
    weeks, extra = divmod(days, 7)
    return weeks * 5 + sum(1 for i in range(extra) if (first.weekday() + i) % 7 < 5)


def _nth_workday(first: date, n: int) -> date:
    """The n-th (0-based) weekday counting from ``first`` (itself a weekday)."""
    weeks, rest = divmod(n, 5)
    day = first + timedelta(days=7 * weeks)
    while rest:
        day += timedelta(days=1)
        if day.weekday() < 5:
            rest -= 1
    return day


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().replace(" ", "").lower()


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (deterministic ties)."""
    if not weights:
        return []
    wsum = sum(weights) or float(len(weights))
    weights = weights if sum(weights) else [1.0] * len(weights)
    quotas = [total * w / wsum for w in weights]
    parts = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


# -- building the program (everything except the contacts, which are streamed) -----------------------------


def _build(participants: int, supporters: int, months: int, contacts: int | None, seed: int, bad_rows: bool,
           start: date) -> _Program:
    if participants < 1 or supporters < 1 or months < 1:
        raise ValueError("participants, supporters and months must be at least 1")
    if contacts is not None and contacts < 0:
        raise ValueError("contacts must be >= 0")
    rng = _rng(seed, "setup")
    start = _weekday_on_or_after(start)
    window_end = _add_months(start, months)
    as_of = window_end - timedelta(days=1)
    staff = _build_staff(rng, supporters)
    persons = [_build_person(rng, i, participants, staff, start, as_of) for i in range(participants)]
    _assign_statuses(rng, persons, as_of)
    mrns = rng.sample(range(1_000_000, 10_000_000), participants)
    for person, mrn in zip(persons, mrns, strict=True):
        person.mrn = f"MRN{mrn:07d}"
    counters = {"goal": 0, "note": 0, "referral": 0, "plan": 0}
    for person in persons:
        _build_goals(rng, person, as_of, counters)
    _cover_behaviors(rng, persons)
    for person in persons:
        _build_notes(rng, person, as_of, counters)
        _build_referrals(rng, person, as_of, counters)
        _build_plans(rng, person, as_of, counters)
    sessions = _build_sessions(rng, persons, staff, start, as_of, months)
    _allocate_contacts(rng, persons, sessions, contacts)
    _choose_voids(rng, persons)
    active = [p for p in persons if p.status == "active" and p.n_valid_contacts > 0]
    unmatched: list[_Person] = []
    ambiguous: list[_Person] = []
    if len(active) >= 2:
        unmatched, ambiguous = ([p] for p in rng.sample(active, 2))
    bad_enrollment = None
    orphans: list[_Contact] = []
    if bad_rows:
        bad_enrollment, orphans = _build_bad_rows(rng, persons, staff, start, as_of)
    return _Program(seed, start, as_of, months, staff, persons, sessions, unmatched, ambiguous, bad_enrollment,
                    orphans)


def _build_staff(rng: Random, count: int) -> list[_Staff]:
    staff = []
    for i in range(count):
        if i < len(_STAFF):
            title, given, family, langs, org = _STAFF[i]
        else:
            title, _, _, langs, org = _STAFF[i % len(_STAFF)]
            lang = langs[0]
            given = rng.choice(_GIVEN[(lang, rng.choice(["female", "male"]))])
            family = rng.choice(_FAMILY[lang])
        domain = "demo-program.example.org"
        staff.append(_Staff(f"S{i + 1:03d}", given, family, title, langs, org, f"(312) 555-01{i % 100:02d}",
                            f"{_ascii(given.split()[0])[:1]}.{_ascii(family)}{'' if i < len(_STAFF) else i}@{domain}"))
    return staff


def _build_person(rng: Random, i: int, total: int, staff: list[_Staff], start: date, as_of: date) -> _Person:
    lang = "es" if rng.random() < 0.45 else "en"
    gender = "female" if rng.random() < 0.62 else "male"
    given = rng.choice(_GIVEN[(lang, gender)])
    family = rng.choice(_FAMILY[lang] if rng.random() < 0.9 else _FAMILY["en" if lang == "es" else "es"])
    birth = start - timedelta(days=rng.randint(29 * 365, 79 * 365))
    eligible = [s for s in staff if lang in s.langs] or staff
    # Caseloads stay balanced: the next participant goes to an eligible supporter (round robin by index).
    supporter = eligible[(i + rng.randint(0, 1)) % len(eligible)]
    span = max(1, int((as_of - start).days * 0.62))
    day = _weekday_on_or_after(start + timedelta(days=int(span * (i + rng.random()) / total)))
    conditions = [rng.choice(["E11.9", "E11.9", "E11.9", "E11.65"])]
    conditions += [c for c, p in (("I10", 0.55), ("E78.5", 0.4), ("E66.9", 0.3)) if rng.random() < p]
    mode_bias = _pick(rng, {"telephone": 40, "face-to-face": 30, "text-message": 20, "video": 7, "email": 3})
    return _Person(index=i, enrollment_id=f"E{i + 1:04d}", participant_id=f"PT{i + 1:04d}", mrn="", lang=lang,
                   gender=gender, given=given, family=family, birth=birth, start=day, end=None, last_day=as_of,
                   status="active", supporter=supporter, conditions=conditions, mode_bias=mode_bias,
                   rate=rng.uniform(2.4, 4.6))


def _assign_statuses(rng: Random, persons: list[_Person], as_of: date) -> None:
    n = len(persons)
    n_completed, n_withdrawn, n_hold = round(n * 0.1), round(n * 0.075), (1 if n >= 12 else 0)
    early = [p for p in persons if (as_of - p.start).days >= 100]
    for p in rng.sample(early, min(n_completed, len(early))):
        p.status = "completed"
        p.end = _weekday_on_or_before(min(p.start + timedelta(weeks=16) + timedelta(days=rng.randint(0, 10)),
                                          as_of - timedelta(days=3)))
        p.last_day = p.end
    rest = [p for p in persons if p.status == "active" and (as_of - p.start).days >= 45]
    for p in rng.sample(rest, min(n_withdrawn, len(rest))):
        p.status = "withdrawn"
        p.end = _weekday_on_or_before(p.start + timedelta(days=rng.randint(24, min(100, (as_of - p.start).days - 7))))
        p.last_day = p.end
    rest = [p for p in persons if p.status == "active" and (as_of - p.start).days >= 60]
    for p in rng.sample(rest, min(n_hold, len(rest))):
        p.status = "on-hold"
        p.last_day = as_of - timedelta(days=rng.randint(21, 35))


def _goal_from_bank(rng: Random, behavior: str, lang: str, used: set[str]) -> tuple[str, tuple | None]:
    options = [g for g in _GOALS[behavior] if g[0] not in used] or _GOALS[behavior]
    en, es, target = rng.choice(options)
    used.add(en)
    text = es if lang == "es" else en
    if target is not None:
        measure, comparator, value, unit = target
        if value is None:  # personal body-weight target
            value = str(rng.randrange(620, 1100, 5) / 10).removesuffix(".0")
        target = (measure, comparator, value, unit)
    return text, target


def _build_goals(rng: Random, person: _Person, as_of: date, counters: dict[str, int]) -> None:
    wanted = int(_pick(rng, {"1": 16, "2": 42, "3": 30, "4": 12}))
    used: set[str] = set()
    day = person.start + timedelta(days=rng.randint(0, 12))
    for local in range(wanted):
        if day > person.last_day:
            break
        behavior = _pick(rng, _BEHAVIOR_WEIGHTS)
        text, target = _goal_from_bank(rng, behavior, person.lang, used)
        due = day + timedelta(weeks=rng.randint(8, 16)) if rng.random() < 0.7 else None
        lifecycle, achievement = _goal_status(rng, person, day, due, as_of)
        counters["goal"] += 1
        person.goals.append(_Goal(
            local=local, seq=counters["goal"], behavior=behavior, text=text, target=target, start=day, due=due,
            lifecycle=lifecycle, achievement=achievement,
            set_by=_pick(rng, {"participant": 45, "together": 40, "supporter": 15}),
            supporter=person.supporter.staff_id if rng.random() < 0.85 else None))
        day += timedelta(days=rng.randint(14, 50))


def _goal_status(rng: Random, person: _Person, start: date, due: date | None, as_of: date) -> tuple[str, str | None]:
    if person.status == "withdrawn":
        return rng.choice([("cancelled", None), ("cancelled", "not-achieved"), ("on-hold", "no-progress")])
    if person.status == "completed":
        return rng.choice([("completed", "achieved"), ("completed", "achieved"), ("completed", "not-achieved"),
                           ("completed", "sustaining"), ("cancelled", "not-attainable")])
    if person.status == "on-hold":
        return ("on-hold", rng.choice(["in-progress", "no-change", None]))
    if (as_of - start).days < 14:
        return rng.choice([("proposed", None), ("accepted", None), ("active", "in-progress")])
    if due is not None and due < as_of:
        return rng.choice([("completed", "achieved"), ("completed", "achieved"), ("completed", "not-achieved"),
                           ("active", "sustaining"), ("active", "improving")])
    return rng.choice([("active", "in-progress"), ("active", "in-progress"), ("active", "improving"),
                       ("active", "improving"), ("active", "worsening"), ("active", "no-change"), ("active", None),
                       ("on-hold", "no-progress")])


def _cover_behaviors(rng: Random, persons: list[_Person]) -> None:
    """Make sure every ADCES7 behaviour has a goal (reassign goals of over-represented behaviours)."""
    goals = [g for p in persons for g in p.goals]
    owner = {id(g): p for p in persons for g in p.goals}
    for behavior in _GOALS:
        counts: dict[str, int] = {}
        for g in goals:
            counts[g.behavior] = counts.get(g.behavior, 0) + 1
        if counts.get(behavior) or not goals:
            continue
        donors = [g for g in goals if counts[g.behavior] > 1]
        if not donors:
            continue
        goal = rng.choice(donors)
        goal.behavior = behavior
        goal.text, goal.target = _goal_from_bank(rng, behavior, owner[id(goal)].lang, set())


def _build_notes(rng: Random, person: _Person, as_of: date, counters: dict[str, int]) -> None:
    local = 0
    for goal in person.goals:
        last = min(goal.due or person.last_day, person.last_day, as_of)
        if rng.random() >= 0.45 or (last - goal.start).days < 10:
            continue
        n = rng.randint(1, 3)
        days = sorted(rng.sample(range(7, (last - goal.start).days + 1), min(n, (last - goal.start).days - 6)))
        for offset in days:
            lang = person.lang if "es" in person.supporter.langs and rng.random() < 0.7 else "en"
            counters["note"] += 1
            local += 1
            goal.notes.append((counters["note"], local, goal.start + timedelta(days=offset),
                               rng.choice(_GOAL_NOTES[lang][goal.behavior]),
                               person.supporter.staff_id if rng.random() < 0.9 else None))


def _build_referrals(rng: Random, person: _Person, as_of: date, counters: dict[str, int]) -> None:
    wanted = int(_pick(rng, {"0": 30, "1": 45, "2": 20, "3": 5}))
    span = (person.last_day - person.start).days
    days = sorted(rng.randint(3, max(3, span)) for _ in range(wanted))
    for local, offset in enumerate(days):
        need = _pick(rng, _NEED_WEIGHTS)
        name, resource_id, _ = rng.choice([r for r in _RESOURCES if r[2] == need])
        on = _weekday_on_or_before(min(person.start + timedelta(days=offset), person.last_day))
        age = (as_of - on).days
        if person.status == "withdrawn":
            status = _pick(rng, {"made": 50, "cancelled": 30, "participant-declined": 20})
        elif age > 30:
            status = _pick(rng, {"completed": 40, "accepted": 20, "participant-declined": 15, "cancelled": 5,
                                 "made": 20})
        else:
            status = _pick(rng, {"made": 60, "accepted": 30, "participant-declined": 10})
        outcome = rng.choice(_REFERRAL_OUTCOMES[status]) if rng.random() < 0.7 else ""
        counters["referral"] += 1
        person.referrals.append(_Referral(local, counters["referral"], name, resource_id, need, on, status, outcome,
                                          person.supporter.staff_id if rng.random() < 0.9 else None))


def _at(day: date, hour: int, minute: int) -> datetime:
    return datetime.combine(day, time(hour, minute))


def _build_plans(rng: Random, person: _Person, as_of: date, counters: dict[str, int]) -> None:
    span = (person.last_day - person.start).days
    plans: list[tuple[datetime, str, str]] = []
    n_done = int(_pick(rng, {"0": 15, "1": 65, "2": 20})) if span >= 21 else 0
    for _ in range(n_done):
        day = _weekday_on_or_before(person.start + timedelta(days=rng.randint(7, span)))
        if day <= person.start:
            continue
        mode = _pick(rng, {"telephone": 50, "face-to-face": 35, "video": 10, "text-message": 5})
        plans.append((_at(day, rng.choice([10, 11, 13, 14, 15, 16]), rng.choice([0, 30])), mode, "done"))
    if span >= 21 and rng.random() < 0.3:
        day = _weekday_on_or_before(person.start + timedelta(days=rng.randint(7, span)))
        plans.append((_at(day, rng.choice([10, 14, 17]), 0), _pick(rng, {"telephone": 60, "face-to-face": 40}),
                      "dropped"))
    if person.status == "active":
        day = _weekday_on_or_after(as_of + timedelta(days=rng.randint(1, 14)))
        plans.append((_at(day, rng.choice([9, 10, 11, 14, 15, 16]), rng.choice([0, 30])),
                      _pick(rng, {"telephone": 50, "face-to-face": 30, "video": 10, "text-message": 10}), "planned"))
    elif person.status == "on-hold":
        plans.append((_at(_weekday_on_or_after(person.last_day + timedelta(days=14)), 10, 0), "telephone", "dropped"))
    for local, (due, mode, status) in enumerate(sorted(plans)):
        counters["plan"] += 1
        person.plans.append(_Plan(local, counters["plan"], due, mode, status,
                                  person.supporter.staff_id if rng.random() < 0.95 else None))


def _build_sessions(rng: Random, persons: list[_Person], staff: list[_Staff], start: date, as_of: date,
                    months: int) -> list[_Session]:
    leaders = [s for s in staff if s.title_text in _GROUP_LEADER_TITLES] or staff[:1]
    # (weekday, hour, minute, setting, duration): church hall Thursday evening, community center Saturday
    # morning, a video group and a class at the clinic.
    plans = [(3, 18, 0, "faith-based", 90), (5, 10, 0, "community-site", 90), (3, 18, 30, "remote", 60),
             (1, 17, 30, "clinic", 90)]
    sessions = []
    for m in range(months + 1):
        first = _add_months(start.replace(day=1), m)
        weekday, hour, minute, setting, duration = plans[m % len(plans)]
        day = first + timedelta(days=(weekday - first.weekday()) % 7 + 14)  # the third such weekday
        if not start + timedelta(days=7) <= day <= as_of:
            continue
        when = _at(day, hour, minute)
        present = [p for p in persons if p.start < day <= p.last_day]
        attendees = sorted(rng.sample(present, min(len(present), rng.randint(4, 8))), key=lambda p: p.index)
        if len(attendees) < 2:
            continue
        session = _Session(f"GS{len(sessions) + 1:03d}", when, setting, leaders[len(sessions) % len(leaders)],
                           duration, _GROUP_TOPICS[len(sessions) % len(_GROUP_TOPICS)])
        sessions.append(session)
        for p in attendees:
            p.fixed.append(_Fixed(when, group=session))
    return sessions


def _allocate_contacts(rng: Random, persons: list[_Person], sessions: list[_Session], contacts: int | None) -> None:
    for p in persons:
        for plan in p.plans:
            if plan.status == "done":
                p.fixed.append(_Fixed(plan.due + timedelta(minutes=rng.choice([0, 0, 5, 10, 20])), plan=plan))
        p.fixed.sort(key=lambda f: f.when)
    natural = []
    for p in persons:
        days = (p.last_day - p.start).days + 1
        natural.append(max(1, round(p.rate * days / 30.44) - len(p.fixed)))
    if contacts is None:
        for p, n in zip(persons, natural, strict=True):
            p.n_filler = n
        return
    fixed_total = sum(len(p.fixed) for p in persons)
    if contacts < fixed_total:  # too few contacts for group sessions and fulfilled plans: drop them
        sessions.clear()
        for p in persons:
            p.fixed.clear()
        fixed_total = 0
    for p, n in zip(persons, _largest_remainder(contacts - fixed_total, [float(n) for n in natural]), strict=True):
        p.n_filler = n


def _choose_voids(rng: Random, persons: list[_Person]) -> None:
    total = sum(p.n_filler for p in persons)
    if total < 20:
        return
    wanted = min(50, max(3, round(total * 0.005)))
    cumulative = []
    running = 0
    for p in persons:
        running += p.n_filler
        cumulative.append(running)
    chosen: dict[int, set[int]] = {}
    for position in rng.sample(range(total), wanted):
        i = bisect.bisect_right(cumulative, position)
        j = position - (cumulative[i - 1] if i else 0)
        if j == 0:  # keep each participant's first contact (the intake) valid
            j = min(1, persons[i].n_filler - 1)
        chosen.setdefault(i, set()).add(j)
    for i, js in chosen.items():
        persons[i].voids = frozenset(js)


def _build_bad_rows(rng: Random, persons: list[_Person], staff: list[_Staff], start: date,
                    as_of: date) -> tuple[_Person, list[_Contact]]:
    n = len(persons)
    bad_enrollment = _Person(
        index=n, enrollment_id=f"E{n + 1:04d}", participant_id=f"PT{n + 1:04d}", mrn="", lang="en",
        gender="female", given="", family="", birth=start, start=_weekday_on_or_after(start + timedelta(days=9)),
        end=None, last_day=as_of, status="active", supporter=staff[0], conditions=["E11.9"], mode_bias="telephone",
        rate=0)
    hosts = [p for p in persons if p.n_valid_contacts > 0 and (p.last_day - p.start).days >= 20] or persons
    picks = [hosts[(len(hosts) * k) // 5] for k in range(5)]

    def contact(person: _Person, problem: str, **extra: Any) -> _Contact:
        day = _weekday_on_or_before(person.start + timedelta(days=rng.randint(10, max(10, (person.last_day -
                                                                                          person.start).days))))
        when = _at(min(day, person.last_day), rng.choice([10, 11, 14, 15]), rng.choice([0, 15, 30, 45]))
        return _Contact(person=person, enrollment_id=person.enrollment_id, instance=0, staff=person.supporter,
                        when=when, mode="telephone", outcome="completed", setting="remote",
                        duration=rng.randint(10, 25), supports=["follow-up"],
                        notes=rng.choice(_NOTES[person.lang if "es" in person.supporter.langs else "en"]["follow-up"]),
                        problem=problem, **extra)

    bad = [contact(picks[0], "unparseable date")]
    w = bad[0].when
    date_text = f"{w.month:02d}/{w.day:02d}/{w.year} {w.hour % 12 or 12}{'pm' if w.hour >= 12 else 'am'}"
    bad[0].raw_when = date_text
    bad.append(contact(picks[1], "unknown mode code", raw_mode={"template": "WhatsApp", "xlsx": "WhatsApp",
                                                                "redcap": "7"}))
    first = contact(picks[2], "duplicate contact id (first of two rows)", dup=1)
    second = contact(picks[2], "duplicate contact id (second of two rows)", dup=2)
    second.when, second.duration, second.notes = first.when, (first.duration or 10) + 5, first.notes + " (re-entered)"
    bad += [first, second]
    bad.append(contact(picks[3], "negative duration"))
    bad[-1].duration = -15  # "15" typed with a stray minus sign
    for person in {id(c.person): c.person for c in bad}.values():
        assert person is not None
        mine = sorted((c for c in bad if c.person is person), key=lambda c: (c.when, c.dup))
        instance = person.n_valid_contacts
        for c in mine:
            instance += 0 if c.dup == 2 else 1
            c.instance = instance
        person.bad_contacts = mine
    # A contact for an enrollment that is not in the input (its enrollment row was never exported).
    orphan = contact(picks[4], "contact references an unknown enrollment")
    orphan.person, orphan.enrollment_id, orphan.instance = None, f"E{n + 2:04d}", 1
    # A goal with a target value but no measure (on a participant whose goals are otherwise fine).
    host = picks[1]
    counters_seq = max((g.seq for p in persons for g in p.goals), default=0)
    day = min(host.start + timedelta(days=30), host.last_day)
    host.goals.append(_Goal(local=len(host.goals), seq=counters_seq + 1, behavior="monitoring",
                            text="Bajar el azúcar" if host.lang == "es" else "Bring my sugar down",
                            target=("", "<", "7", "%"), start=day, due=None, lifecycle="active",
                            achievement="in-progress", set_by="participant", supporter=host.supporter.staff_id,
                            bad=True))
    return bad_enrollment, [orphan]


# -- streaming the contacts ------------------------------------------------------------------------------------


def _person_contacts(program: _Program, person: _Person) -> Iterator[_Contact]:
    """One participant's valid contacts in time order (then the participant's bad contact rows), lazily."""
    rng = _rng(program.seed, "contacts", person.index)
    k = person.n_filler
    first_day = _weekday_on_or_after(person.start)
    workdays = max(1, _count_workdays(first_day, person.last_day))
    slots = workdays * _SLOTS_PER_DAY
    fixed = person.fixed
    fi = 0
    instance = 0
    introduced: set[int] = set()
    intake_done = False
    for j in range(k):
        slot = min(int((j + rng.random()) * slots / k), slots - 1)
        day = _nth_workday(first_day, slot // _SLOTS_PER_DAY)
        when = datetime.combine(day, _DAY_START) + timedelta(minutes=5 * (slot % _SLOTS_PER_DAY))
        while fi < len(fixed) and fixed[fi].when <= when:
            instance += 1
            yield _fixed_contact(rng, program, person, fixed[fi], instance, introduced)
            fi += 1
        instance += 1
        contact = _filler_contact(rng, program, person, when, instance, intake=not intake_done,
                                  introduced=introduced, void=j in person.voids)
        intake_done = intake_done or contact.outcome == "completed"
        yield contact
    while fi < len(fixed):
        instance += 1
        yield _fixed_contact(rng, program, person, fixed[fi], instance, introduced)
        fi += 1


def _note_lang(rng: Random, person: _Person, staff: _Staff) -> str:
    return "es" if person.lang == "es" and "es" in staff.langs and rng.random() < 0.7 else "en"


def _fixed_contact(rng: Random, program: _Program, person: _Person, fixed: _Fixed, instance: int,
                   introduced: set[int]) -> _Contact:
    if fixed.group is not None:
        s = fixed.group
        lang = _note_lang(rng, person, s.leader)
        return _Contact(person=person, enrollment_id=person.enrollment_id, instance=instance, staff=s.leader,
                        when=s.when, mode="group", outcome="completed", setting=s.setting, duration=s.duration,
                        supports=list(s.topic[2]), notes=s.topic[1] if lang == "es" else s.topic[0], session=s,
                        elements=(["education-skills-training", "ongoing-follow-up-support"]
                                  if int(s.session_id[2:]) % 2 == 0 else []))
    plan = fixed.plan
    assert plan is not None
    staff = person.supporter
    lang = _note_lang(rng, person, staff)
    supports = _sample_weighted(rng, _SUPPORT_WEIGHTS["remote" if plan.mode != "face-to-face" else "home"],
                                rng.choice([1, 2, 2, 3]))
    setting = "remote" if plan.mode != "face-to-face" else rng.choice(["home", "community-site", "clinic"])
    return _Contact(person=person, enrollment_id=person.enrollment_id, instance=instance, staff=staff,
                    when=fixed.when, mode=plan.mode, outcome="completed", setting=setting,
                    duration=_duration(rng, plan.mode, "completed", setting), supports=supports,
                    notes=rng.choice(_NOTES[lang][supports[0]]), plan=plan,
                    goals=_goal_links(rng, person, fixed.when.date(), introduced))


def _duration(rng: Random, mode: str, outcome: str, setting: str | None) -> int | None:
    if outcome == "cancelled":
        return None
    if outcome == "not-reached":
        return rng.choice([None, 0, 1, 2]) if mode == "telephone" else None
    if mode == "telephone":
        return rng.randint(4, 35)
    if mode == "face-to-face":
        return rng.randrange(45, 95, 5) if setting == "home" else rng.randrange(20, 75, 5)
    if mode == "video":
        return rng.randrange(15, 50, 5)
    if mode == "text-message":
        return rng.choice([None, None, 2, 5])
    return None


def _goal_links(rng: Random, person: _Person, day: date, introduced: set[int]) -> list[_Goal]:
    current = [g for g in person.goals if not g.bad and g.start <= day <= (g.due or day) + timedelta(days=30)]
    new = [g for g in current if g.local not in introduced]
    if new:
        introduced.add(new[0].local)
        return [new[0]]
    if current and rng.random() < 0.35:
        return sorted(rng.sample(current, min(len(current), rng.choice([1, 1, 2]))), key=lambda g: g.local)
    return []


_BASE_MODES = {"telephone": 38.0, "face-to-face": 27.0, "text-message": 17.0, "video": 9.0, "email": 4.0}
# Each participant prefers one mode (twice its base weight).
_MODE_WEIGHTS = {bias: _Weights({m: w * (2 if m == bias else 1) for m, w in _BASE_MODES.items()})
                 for bias in _BASE_MODES}
_OUTCOME_WEIGHTS = {
    "telephone": _Weights({"completed": 82, "not-reached": 15, "cancelled": 3}),
    "text-message": _Weights({"completed": 88, "not-reached": 12}),
    "email": _Weights({"completed": 95, "not-reached": 5}),
    "face-to-face": _Weights({"completed": 90, "cancelled": 10}),
    "video": _Weights({"completed": 84, "not-reached": 6, "cancelled": 10}),
}
_F2F_SETTINGS = _Weights({"home": 34, "community-site": 28, "clinic": 24, "faith-based": 8, "other": 6})


def _filler_contact(rng: Random, program: _Program, person: _Person, when: datetime, instance: int, *, intake: bool,
                    introduced: set[int], void: bool) -> _Contact:
    staff = person.supporter
    if rng.random() < 0.08:  # covering for a colleague
        others = [s for s in program.staff if s is not staff and person.lang in s.langs]
        staff = rng.choice(others) if others else staff
    lang = _note_lang(rng, person, staff)
    if intake:
        mode, outcome = "face-to-face", "completed"
        setting = rng.choice(["home", "clinic", "community-site"])
    else:
        mode = _MODE_WEIGHTS[person.mode_bias].pick(rng)
        outcome = _OUTCOME_WEIGHTS[mode].pick(rng)
        if mode == "face-to-face":  # noqa: SIM108 - a nested conditional expression would read worse
            setting = _F2F_SETTINGS.pick(rng)
        else:
            setting = "remote" if rng.random() < 0.85 else None
    contact = _Contact(person=person, enrollment_id=person.enrollment_id, instance=instance, staff=staff, when=when,
                       mode=mode, outcome=outcome, setting=setting, void=void)
    if setting == "other":
        text = rng.choice(_OTHER_SETTINGS)
        contact.setting_text = None if text == "other" else text
    contact.duration = _duration(rng, mode, outcome, setting)
    if outcome == "completed":
        context = {"home": "home", "clinic": "clinic", "community-site": "community", "faith-based": "community",
                   "other": "community"}.get(setting or "", "remote")
        if intake:
            contact.supports = ["education", "emotional"] + (["care-coordination"] if rng.random() < 0.3 else [])
            contact.elements = ["individualized-assessment"]
        else:
            contact.supports = _sample_weighted(rng, _SUPPORT_WEIGHTS[context], rng.choice([1, 1, 2, 2, 2, 3]))
        contact.goals = _goal_links(rng, person, when.date(), introduced)
        if contact.goals and contact.goals[0].start >= when.date() - timedelta(days=60) and len(contact.goals) == 1 \
                and rng.random() < 0.5:
            contact.elements = [*contact.elements, "collaborative-goal-setting"]
        if contact.elements or rng.random() < 0.2:  # record the elements explicitly (else: element_rules)
            contact.elements += _implied(contact.supports)
            contact.elements = list(dict.fromkeys(contact.elements))
        if intake:
            key = "intake"
        elif mode in ("text-message", "email") and rng.random() < 0.6:
            key = mode
        else:
            key = contact.supports[0]
        contact.notes = rng.choice(_NOTES[lang][key]) if rng.random() < 0.85 else ""
    elif outcome == "not-reached":
        if rng.random() < 0.12:
            contact.aliases["outcome"] = "no answer"
        contact.supports = ["outreach"] if rng.random() < 0.7 else []
        contact.notes = rng.choice(_NOTES[lang]["not-reached"]) if rng.random() < 0.8 else ""
    else:
        contact.notes = rng.choice(_NOTES[lang]["cancelled"])
    # How the row is written (template only): an explicit offset, or an alias spelling of one code.
    contact.offset = rng.random() < 0.02 or (intake and person.index == 0)  # one in standard time (-06:00)
    if rng.random() < 0.06:
        fld = rng.choice(["mode", "outcome", "setting", "support_types"])
        value = {"mode": mode, "outcome": outcome, "setting": setting,
                 "support_types": contact.supports[0] if contact.supports else None}[fld]
        spellings = TEMPLATE_ALIASES[fld].get(value or "")
        if spellings:
            contact.aliases[fld] = spellings[0] if rng.random() < 0.5 else rng.choice(spellings)
    return contact


_ELEMENT_RULES = {
    "emotional": "ongoing-follow-up-support", "instrumental": "community-resource-linkage",
    "education": "education-skills-training", "skills-training": "education-skills-training",
    "follow-up": "ongoing-follow-up-support", "outreach": "ongoing-follow-up-support",
    "care-coordination": "clinical-care-access", "community-linkage": "community-resource-linkage",
    "clinical-access-assistance": "clinical-care-access",
}


def _implied(supports: list[str]) -> list[str]:
    return list(dict.fromkeys(_ELEMENT_RULES[s] for s in supports if s in _ELEMENT_RULES))


def _all_contacts_by_person(program: _Program, person: _Person) -> Iterator[_Contact]:
    yield from _person_contacts(program, person)
    yield from person.bad_contacts


def _contacts_in_time_order(program: _Program) -> Iterator[_Contact]:
    """Every contact row of the program, merged across participants in date-time order (streaming)."""
    streams: list[Iterable[_Contact]] = [_person_contacts(program, p) for p in program.persons]
    extra = sorted([c for p in program.persons for c in p.bad_contacts] + program.orphan_contacts,
                   key=lambda c: (c.when, c.dup))
    streams.append(extra)
    return heapq.merge(*streams, key=lambda c: (c.when, c.person.index if c.person else -1, c.instance, c.dup))


# -- writers ---------------------------------------------------------------------------------------------------


def _local_text(when: datetime, offset: bool = False) -> str:
    if offset:
        return when.replace(tzinfo=_ZONE).isoformat()
    return when.strftime("%Y-%m-%d %H:%M")


def _number(value: str) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else number


class _Tally:
    """Row counts per kind and the bad rows, kept while writing."""

    def __init__(self) -> None:
        self.rows = {k: 0 for k in KINDS}
        self.valid = {k: 0 for k in KINDS}
        self.bad: list[BadRow] = []
        self.voided = 0
        self.group_contacts = 0
        self.fulfilling = 0

    def count(self, kind: str, valid: bool = True) -> None:
        self.rows[kind] += 1
        if valid:
            self.valid[kind] += 1

    def contact(self, c: _Contact) -> None:
        self.count("contact", c.problem is None)
        if c.problem is None:
            self.voided += c.void
            self.group_contacts += c.session is not None
            self.fulfilling += c.plan is not None


class _TemplateRows:
    """Rows of the peersync template (values typed for Excel when ``excel`` is set, else text)."""

    def __init__(self, program: _Program, excel: bool) -> None:
        self.program = program
        self.excel = excel
        self._next_contact = 0
        self._dup_id: str | None = None

    def _date(self, value: date | None, us_style: bool = False) -> Any:
        if value is None:
            return None if self.excel else ""
        if self.excel:
            return value
        return value.strftime("%m/%d/%Y") if us_style else value.isoformat()

    def _dt(self, value: datetime, offset: bool = False) -> Any:
        return value if self.excel else _local_text(value, offset)

    def _num(self, value: int | None) -> Any:
        if value is None:
            return None if self.excel else ""
        return value if self.excel else str(value)

    def _text(self, value: str | None) -> Any:
        if self.excel:
            return value if value else None
        return value or ""

    def supporters(self) -> Iterator[list[Any]]:
        for s in self.program.staff:
            yield [s.staff_id, s.given, s.family, s.title_text, s.organization, s.phone, s.email, self._text(None),
                   "yes"]

    def enrollments(self) -> Iterator[tuple[list[Any], _Person]]:
        persons = list(self.program.persons)
        if self.program.bad_enrollment is not None:
            persons.append(self.program.bad_enrollment)
        for p in persons:
            yield [p.enrollment_id, p.participant_id, self._text(p.mrn), self._date(p.start), self._date(p.end),
                   p.status, p.supporter.staff_id, ";".join(p.conditions), self._text(None), self._text(None)], p

    def goals(self) -> Iterator[tuple[list[Any], _Person, _Goal]]:
        for p in self.program.persons:
            for g in p.goals:
                measure, comparator, value, unit = g.target or ("", "", "", "")
                yield [f"G{g.seq:04d}", p.enrollment_id, g.text, g.behavior, self._text(measure),
                       self._text(comparator), (_number(value) if value else None) if self.excel else value,
                       self._text(unit), self._date(g.start), self._date(g.due), g.lifecycle,
                       self._text(g.achievement), self._text(None), self._text(None), g.set_by,
                       self._text(g.supporter), self._text(None)], p, g

    def goal_notes(self) -> Iterator[list[Any]]:
        for p in self.program.persons:
            for g in p.goals:
                for seq, _local, day, text, sid in g.notes:
                    yield [f"GN{seq:04d}", f"G{g.seq:04d}", self._date(day), self._text(sid), text]

    def referrals(self) -> Iterator[list[Any]]:
        for p in self.program.persons:
            for r in p.referrals:
                yield [f"R{r.seq:04d}", p.enrollment_id, self._text(r.supporter), r.resource,
                       self._text(r.resource_id), r.need, self._date(r.on, us_style=r.seq % 9 == 4), r.status,
                       self._text(None), self._text(r.outcome), self._text(None)]

    def planned(self) -> Iterator[list[Any]]:
        for p in self.program.persons:
            for plan in p.plans:
                yield [f"PC{plan.seq:04d}", p.enrollment_id, self._text(plan.supporter), self._dt(plan.due),
                       plan.mode, plan.status, self._text(None)]

    def contact(self, c: _Contact) -> list[Any]:
        if c.dup == 2 and self._dup_id is not None:
            cid = self._dup_id
        else:
            self._next_contact += 1
            cid = f"C{self._next_contact:06d}"
            if c.dup == 1:
                self._dup_id = cid
        fmt = "xlsx" if self.excel else "template"
        mode = c.raw_mode[fmt] if c.raw_mode is not None else c.aliases.get("mode", c.mode)
        setting = c.setting_text or c.aliases.get("setting", c.setting or "")
        supports = list(c.supports)
        if "support_types" in c.aliases and supports:
            supports[0] = c.aliases["support_types"]
        when = c.raw_when if c.raw_when is not None else self._dt(c.when, c.offset)
        return [cid, c.enrollment_id, c.staff.staff_id, when, self._num(c.duration), mode, self._text(setting),
                c.aliases.get("outcome", c.outcome), self._text(";".join(supports)), self._text(";".join(c.elements)),
                self._text(";".join(f"G{g.seq:04d}" for g in c.goals)), self._text(c.notes),
                self._text(c.session.session_id if c.session else None),
                self._text(f"PC{c.plan.seq:04d}" if c.plan else None), (1 if self.excel else "1") if c.void else
                self._text(None)]


def _csv_writer(handle: io.TextIOBase) -> Any:
    return csv.writer(handle, lineterminator="\n")


def _bad_enrollment_row(tally: _Tally, file: str, row: int, person: _Person) -> None:
    tally.bad.append(BadRow("enrollment", "missing MRN", file, row, person.enrollment_id, "mrn"))


def _goal_bad_row(tally: _Tally, file: str, row: int, goal_id: str) -> None:
    tally.bad.append(BadRow("goal", "target value without a measure", file, row, goal_id, "target_measure"))


_CONTACT_BAD_FIELDS = {"unparseable date": "occurred_at", "unknown mode code": "mode",
                       "duplicate contact id (first of two rows)": "contact_id",
                       "duplicate contact id (second of two rows)": "contact_id",
                       "negative duration": "duration_minutes",
                       "contact references an unknown enrollment": "enrollment_id"}


def _write_template(program: _Program, out_dir: Path, tally: _Tally) -> list[Path]:
    rows = _TemplateRows(program, excel=False)
    written = []

    def open_csv(kind: str) -> tuple[Path, io.TextIOWrapper, Any]:
        path = out_dir / TEMPLATE_FILES[kind]
        handle = path.open("w", encoding="utf-8", newline="")
        writer = _csv_writer(handle)
        writer.writerow(TEMPLATE_COLUMNS[kind])
        written.append(path)
        return path, handle, writer

    path, handle, writer = open_csv("supporter")
    with handle:
        for row in rows.supporters():
            writer.writerow(row)
            tally.count("supporter")
    path, handle, writer = open_csv("enrollment")
    with handle:
        for row, person in rows.enrollments():
            writer.writerow(row)
            bad = person is program.bad_enrollment
            tally.count("enrollment", not bad)
            if bad:
                _bad_enrollment_row(tally, path.name, tally.rows["enrollment"] + 1, person)
    path, handle, writer = open_csv("goal")
    with handle:
        for row, _person, goal in rows.goals():
            writer.writerow(row)
            tally.count("goal", not goal.bad)
            if goal.bad:
                _goal_bad_row(tally, path.name, tally.rows["goal"] + 1, row[0])
    for kind, source in (("goal_note", rows.goal_notes), ("referral", rows.referrals),
                         ("planned_contact", rows.planned)):
        path, handle, writer = open_csv(kind)
        with handle:
            for row in source():
                writer.writerow(row)
                tally.count(kind)
    path, handle, writer = open_csv("contact")
    with handle:
        for c in _contacts_in_time_order(program):
            row = rows.contact(c)
            writer.writerow(row)
            tally.contact(c)
            if c.problem:
                tally.bad.append(BadRow("contact", c.problem, path.name, tally.rows["contact"] + 1, row[0],
                                        _CONTACT_BAD_FIELDS[c.problem]))
    return written


def _write_xlsx(program: _Program, out_dir: Path, tally: _Tally) -> list[Path]:
    from openpyxl import Workbook

    rows = _TemplateRows(program, excel=True)
    workbook = Workbook(write_only=True)
    path = out_dir / XLSX_FILE
    sheets = {kind: workbook.create_sheet(TEMPLATE_SHEETS[kind]) for kind in KINDS}
    for kind, sheet in sheets.items():
        sheet.append(TEMPLATE_COLUMNS[kind])
    name = f"{path.name}[{{}}]"
    for row in rows.supporters():
        sheets["supporter"].append(row)
        tally.count("supporter")
    for row, person in rows.enrollments():
        sheets["enrollment"].append(row)
        bad = person is program.bad_enrollment
        tally.count("enrollment", not bad)
        if bad:
            _bad_enrollment_row(tally, name.format("Enrollments"), tally.rows["enrollment"] + 1, person)
    for row, _person, goal in rows.goals():
        sheets["goal"].append(row)
        tally.count("goal", not goal.bad)
        if goal.bad:
            _goal_bad_row(tally, name.format("Goals"), tally.rows["goal"] + 1, row[0])
    for kind, source in (("goal_note", rows.goal_notes), ("referral", rows.referrals),
                         ("planned_contact", rows.planned)):
        for row in source():
            sheets[kind].append(row)
            tally.count(kind)
    for c in _contacts_in_time_order(program):
        row = rows.contact(c)
        sheets["contact"].append(row)
        tally.contact(c)
        if c.problem:
            tally.bad.append(BadRow("contact", c.problem, name.format("Contacts"), tally.rows["contact"] + 1, row[0],
                                    _CONTACT_BAD_FIELDS[c.problem]))
    _save_workbook(workbook, path)
    return [path]


def _write_redcap(program: _Program, out_dir: Path, tally: _Tally) -> list[Path]:
    staff_path = out_dir / REDCAP_STAFF_FILE
    with staff_path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = _csv_writer(handle)
        writer.writerow(REDCAP_STAFF_COLUMNS)
        for s in program.staff:
            writer.writerow([s.staff_id, s.given, s.family, s.title_text, s.organization, s.phone, s.email, "1"])
            tally.count("supporter")
    data_path = out_dir / REDCAP_DATA_FILE
    row_number = 1
    with data_path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = _csv_writer(handle)
        writer.writerow(REDCAP_COLUMNS)

        def emit(values: dict[str, Any]) -> int:
            nonlocal row_number
            writer.writerow([values.get(c, "") for c in REDCAP_COLUMNS])
            row_number += 1
            return row_number

        persons = list(program.persons)
        if program.bad_enrollment is not None:
            persons.append(program.bad_enrollment)
        for p in persons:
            bad = p is program.bad_enrollment
            row = emit(_redcap_enrollment(p))
            tally.count("enrollment", not bad)
            if bad:
                _bad_enrollment_row(tally, data_path.name, row, p)
            for g in p.goals:
                row = emit(_redcap_goal(p, g))
                tally.count("goal", not g.bad)
                if g.bad:
                    _goal_bad_row(tally, data_path.name, row, f"{p.enrollment_id}-g{g.local + 1}")
            for g in p.goals:
                for _seq, local, day, text, sid in g.notes:
                    emit({"record_id": p.enrollment_id, "redcap_repeat_instrument": "goal_note",
                          "redcap_repeat_instance": local, "note_goal_instance": g.local + 1,
                          "note_date": day.isoformat(), "note_staff": sid or "", "note_text": text,
                          "goal_note_complete": 2})
                    tally.count("goal_note")
            contacts = _all_contacts_by_person(program, p) if not bad else iter(())
            for c in contacts:
                row = emit(_redcap_contact(c))
                tally.contact(c)
                if c.problem:
                    tally.bad.append(BadRow("contact", c.problem, data_path.name, row,
                                            f"{c.enrollment_id}-c{c.instance}", _CONTACT_BAD_FIELDS[c.problem]))
            for r in p.referrals:
                emit({"record_id": p.enrollment_id, "redcap_repeat_instrument": "referral",
                      "redcap_repeat_instance": r.local + 1, "ref_date": r.on.isoformat(),
                      "ref_staff": r.supporter or "", "ref_resource": r.resource, "ref_resource_id": r.resource_id,
                      "ref_need": redcap_code("ref_need", r.need), "ref_status": redcap_code("ref_status", r.status),
                      "ref_outcome": r.outcome, "referral_complete": 2})
                tally.count("referral")
            for plan in p.plans:
                emit({"record_id": p.enrollment_id, "redcap_repeat_instrument": "next_contact",
                      "redcap_repeat_instance": plan.local + 1, "next_due": _local_text(plan.due),
                      "next_mode": redcap_code("next_mode", plan.mode), "next_staff": plan.supporter or "",
                      "next_status": redcap_code("next_status", plan.status), "next_contact_complete": 2})
                tally.count("planned_contact")
        for c in program.orphan_contacts:
            row = emit(_redcap_contact(c))
            tally.contact(c)
            tally.bad.append(BadRow("contact", c.problem or "", data_path.name, row,
                                    f"{c.enrollment_id}-c{c.instance}", _CONTACT_BAD_FIELDS[c.problem or ""]))
    return [staff_path, data_path]


def _redcap_enrollment(p: _Person) -> dict[str, Any]:
    values: dict[str, Any] = {
        "record_id": p.enrollment_id, "participant_id": p.participant_id, "mrn": p.mrn,
        "enroll_date": p.start.isoformat(), "enroll_supporter": p.supporter.staff_id,
        "enroll_status": redcap_code("enroll_status", p.status), "enroll_end_date": p.end.isoformat() if p.end else "",
        "enrollment_complete": 2,
    }
    for i, code in enumerate(CONDITIONS, start=1):
        values[f"dx___{i}"] = int(code in p.conditions)
    return values


def _redcap_goal(p: _Person, g: _Goal) -> dict[str, Any]:
    measure, comparator, value, unit = g.target or ("", "", "", "")
    return {
        "record_id": p.enrollment_id, "redcap_repeat_instrument": "goal", "redcap_repeat_instance": g.local + 1,
        "goal_text": g.text, "goal_behavior": redcap_code("goal_behavior", g.behavior),
        "goal_measure": redcap_code("goal_measure", measure) if measure else "",
        "goal_comparator": redcap_code("goal_comparator", comparator) if comparator else "",
        "goal_target": value, "goal_unit": unit, "goal_start": g.start.isoformat(),
        "goal_due": g.due.isoformat() if g.due else "", "goal_status": redcap_code("goal_status", g.lifecycle),
        "goal_achievement": redcap_code("goal_achievement", g.achievement) if g.achievement else "",
        "goal_set_by": redcap_code("goal_set_by", g.set_by), "goal_staff": g.supporter or "",
        "goal_complete": 2,
    }


def _redcap_contact(c: _Contact) -> dict[str, Any]:
    values: dict[str, Any] = {
        "record_id": c.enrollment_id, "redcap_repeat_instrument": "peer_contact",
        "redcap_repeat_instance": c.instance,
        "contact_datetime": c.raw_when if c.raw_when is not None else _local_text(c.when),
        "contact_staff": c.staff.staff_id,
        "contact_mode": c.raw_mode["redcap"] if c.raw_mode else redcap_code("contact_mode", c.mode),
        "contact_setting": redcap_code("contact_setting", c.setting) if c.setting else "",
        "contact_duration": "" if c.duration is None else c.duration,
        "contact_outcome": redcap_code("contact_outcome", c.outcome),
        "contact_goal_ids": ",".join(f"{c.enrollment_id}-g{g.local + 1}" for g in c.goals),
        "contact_group_id": c.session.session_id if c.session else "",
        "contact_next_instance": c.plan.local + 1 if c.plan else "",
        "contact_notes": c.notes, "contact_void": int(c.void), "peer_contact_complete": 2,
    }
    for i, code in enumerate(REDCAP_SUPPORT_CHECKBOXES, start=1):
        values[f"support___{i}"] = int(code in c.supports)
    for i, code in enumerate(REDCAP_ELEMENT_CHECKBOXES, start=1):
        values[f"elements___{i}"] = int(code in c.elements)
    return values


# -- the clinic's Patients -------------------------------------------------------------------------------------


def _patient(p: _Person, given: str | None = None, birth: date | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                                 "display": "Medical record number"}]},
            "system": MRN_SYSTEM,
            "value": p.mrn,
        }],
        "name": [{"use": "official", "family": p.family, "given": (given or p.given).split()}],
        "gender": p.gender,
        "birthDate": (birth or p.birth).isoformat(),
    }
    if p.lang == "es":
        resource["communication"] = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "es",
                                                               "display": "Spanish"}]}, "preferred": True}]
    return resource


def _write_patients(program: _Program, path: Path) -> int:
    """The clinic EHR's Patients as a FHIR R4 transaction Bundle. Returns the number of Patient entries.

    Each Patient is a conditional update on its MRN (``PUT Patient?identifier=<system>|<mrn>``), so loading
    the bundle again changes nothing. One participant has no Patient (unmatched MRN). Two Patients share
    another participant's MRN (ambiguous): a conditional update on that MRN would match both on the next load
    and fail the whole transaction (412), so both are plain client-id updates, ``PUT Patient/demo-dup-1``
    and ``PUT Patient/demo-dup-2``, which cannot collide with anything and stay idempotent.
    """
    rng = _rng(program.seed, "patients")
    unmatched = {p.index for p in program.unmatched}
    ambiguous = {p.index for p in program.ambiguous}
    entries = []
    duplicates = []
    for p in program.persons:
        if p.index in unmatched:
            continue
        resource = _patient(p)
        if p.index in ambiguous:
            # A second person registered under the same MRN (a registration error the clinic has to fix).
            other = _patient(p, given=rng.choice(_GIVEN[(p.lang, p.gender)]),
                             birth=p.birth + timedelta(days=rng.randint(8000, 9500)))
            for n, res in enumerate((resource, other), start=1):
                res["id"] = f"demo-dup-{n}"
                duplicates.append({"fullUrl": f"urn:uuid:{_uuid(rng)}", "resource": res,
                                   "request": {"method": "PUT", "url": f"Patient/demo-dup-{n}"}})
            continue
        query = quote(f"{MRN_SYSTEM}|{p.mrn}", safe="")
        entries.append({"fullUrl": f"urn:uuid:{_uuid(rng)}", "resource": resource,
                        "request": {"method": "PUT", "url": f"Patient?identifier={query}"}})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries + duplicates}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bundle, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return len(entries) + len(duplicates)


def _uuid(rng: Random) -> str:
    value = rng.getrandbits(128)
    value = (value & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# -- public API ------------------------------------------------------------------------------------------------


def generate_program(
    out_dir: Path,
    *,
    participants: int = 40,
    supporters: int = 6,
    months: int = 6,
    contacts: int | None = None,
    seed: int = DEFAULT_SEED,
    fmt: Format = "template",
    bad_rows: bool = True,
    start: date = DEFAULT_START,
    clinic_dir: Path | None = None,
) -> GenerationSummary:
    """Write a synthetic peer-support program into ``out_dir`` and return what was written.

    Args:
        out_dir: folder for the program's files (created if needed); existing files of the same names are
            overwritten.
        participants: enrollments (valid ones; the bad-MRN enrollment row comes on top).
        supporters: peer supporters (titles and names cycle past the six built-in ones).
        months: length of the program window from ``start``; ``as_of`` is its last day.
        contacts: exact number of *valid* contact rows (group attendances and contacts that fulfil a plan
            included); None gives the natural number (a few per participant per month). Contacts are
            streamed, so millions are fine.
        seed: same seed (and arguments) -> byte-identical files.
        fmt: "template" (CSV per kind), "xlsx" (one workbook) or "redcap" (flat REDCap export + staff.csv).
        bad_rows: add the deliberate bad rows (see :class:`BadRow`); with False every row is valid.
        start: first day of the program window (moved to a weekday).
        clinic_dir: where clinic/patients.json goes (default ``out_dir / "clinic"``).
    """
    if fmt not in ("template", "redcap", "xlsx"):
        raise ValueError(f"unknown format {fmt!r} (template, redcap or xlsx)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clinic_dir = Path(clinic_dir) if clinic_dir is not None else out_dir / "clinic"
    program = _build(participants, supporters, months, contacts, seed, bad_rows, start)
    tally = _Tally()
    writer = {"template": _write_template, "xlsx": _write_xlsx, "redcap": _write_redcap}[fmt]
    paths = writer(program, out_dir, tally)
    patients_path = clinic_dir / "patients.json"
    n_patients = _write_patients(program, patients_path)
    paths.append(patients_path)
    summary_path = out_dir / "summary.json"
    rejects_by_kind = {k: tally.rows[k] - tally.valid[k] for k in KINDS if tally.rows[k] != tally.valid[k]}
    summary = GenerationSummary(
        fmt=fmt, seed=seed, start=program.start.isoformat(), as_of=program.as_of.isoformat(), months=months,
        counts=dict(tally.valid), rows=dict(tally.rows), expected_rejects=sum(rejects_by_kind.values()),
        expected_rejects_by_kind=rejects_by_kind,
        unmatched_enrollments=[p.enrollment_id for p in program.unmatched],
        ambiguous_enrollments=[p.enrollment_id for p in program.ambiguous],
        files=[_relative(p, out_dir) for p in [*paths, summary_path]],
        bad_rows=tally.bad, voided_contacts=tally.voided, group_sessions=len(program.sessions),
        group_contacts=tally.group_contacts, contacts_fulfilling_plans=tally.fulfilling, patients=n_patients,
    )
    summary_path.write_text(json.dumps(summary.as_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return summary


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


# -- Excel: deterministic workbooks and the blank template ------------------------------------------------------


def _save_workbook(workbook: Any, path: Path) -> None:
    """Save a workbook byte-identically run to run: fixed document timestamps and zip entry dates."""
    buffer = io.BytesIO()
    workbook.properties.creator = "peersync"
    workbook.save(buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:\2>)",
                              rb"\g<1>" + _XLSX_TIMESTAMP.encode() + rb"\g<3>", data)
            entry = zipfile.ZipInfo(info.filename, date_time=(2026, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o600 << 16
            target.writestr(entry, data)


# What each template column holds, for the Instructions sheet.
COLUMN_HELP: dict[str, dict[str, str]] = {
    "supporter": {
        "staff_id": "Your id for the peer supporter (any text; never a name).",
        "given_name": "First name(s).", "family_name": "Last name(s).",
        "title": "Title as your program writes it (Promotora, CHW, Peer Coach...).",
        "organization": "Organization or site.", "phone": "Work phone.", "email": "Work email.",
        "npi": "10-digit NPI, if the supporter has one.", "active": "yes / no.",
    },
    "enrollment": {
        "enrollment_id": "Your id for this enrollment (E0001...). Never an MRN or a name.",
        "participant_id": "Your participant id, if you keep one besides the enrollment id.",
        "mrn": "The participant's medical record number at the clinic (matches the EHR Patient).",
        "start_date": "Date enrolled.", "end_date": "Date the enrollment ended (completed or withdrawn).",
        "status": "Enrollment status.", "supporter_id": "staff_id of the assigned peer supporter.",
        "conditions": "Diagnosis codes (ICD-10-CM), separated by ;.",
        "clinic_referral": "The clinic's referral this enrollment answers: the id in the intake file's "
                           "clinic_referral column (peersync pull). Leave empty otherwise.",
        "clinical_consent": "yes when the participant consented to the program reading their HbA1c, blood "
                            "pressure and appointments from the clinic (peersync pull). Empty means no.",
    },
    "goal": {
        "goal_id": "Your id for the goal (G0001...).", "enrollment_id": "The participant's enrollment_id.",
        "goal_in_own_words": "The goal in the participant's own words.", "behavior": "ADCES7 self-care behaviour.",
        "target_measure": "Measurable target (optional): what is measured.",
        "target_comparator": "Target comparison.", "target_value": "Target number, e.g. 7 or 7000.",
        "target_unit": "Target unit, e.g. %, /d, min/wk, d/wk, kg, mg/dL.", "start_date": "Date the goal was set.",
        "due_date": "Target date (optional).", "lifecycle_status": "Goal status.",
        "achievement_status": "Progress (optional).",
        "status_date": "Date the status last changed (optional; leave empty when not recorded).",
        "outcome_observation": "The clinic's result that shows how the goal turned out, as Observation/<id> "
                               "(optional; e.g. hba1c_observation from peersync pull's clinical-facts.csv).",
        "set_by": "Who set the goal.",
        "supporter_id": "staff_id of the supporter who helped set it (optional).",
        "void": "1 / yes if the row was entered in error.",
    },
    "goal_note": {
        "note_id": "Your id for the note.", "goal_id": "The goal's goal_id.", "date": "Date of the note.",
        "supporter_id": "staff_id of the writer (optional).", "note": "Progress note text.",
    },
    "contact": {
        "contact_id": "Your id for the contact (C000001...).", "enrollment_id": "The participant's enrollment_id.",
        "supporter_id": "staff_id of the peer supporter.",
        "contact_datetime": f"Date and local time ({TIMEZONE}), or with an offset (2026-03-04T10:30:00-06:00).",
        "duration_minutes": "Minutes (whole number, 0 or more).", "mode": "How the contact happened.",
        "setting": "Where (optional).", "outcome": "Completed, not reached or cancelled.",
        "support_types": "Support given, separated by ;.",
        "essential_elements": "Essential elements addressed, separated by ; (leave empty to derive them from the "
                              "support types).",
        "goal_ids": "goal_id(s) discussed, separated by ;.", "notes": "Short note (may span lines).",
        "group_session_id": "Same id on every attendee's row of one group session.",
        "planned_contact_id": "The planned contact this contact fulfils, if any.",
        "void": "1 / yes if the row was entered in error.",
    },
    "referral": {
        "referral_id": "Your id for the referral.", "enrollment_id": "The participant's enrollment_id.",
        "supporter_id": "staff_id of the supporter who referred (optional).",
        "resource_name": "Community resource (food pantry, YMCA program...).",
        "resource_id": "The resource's id in your directory (optional).", "need": "Need addressed.",
        "referral_date": "Date referred.", "status": "Referral status.",
        "status_date": "Date the status last changed (optional; leave empty when not recorded).",
        "outcome_notes": "What happened (optional).",
        "void": "1 / yes if the row was entered in error.",
    },
    "planned_contact": {
        "planned_contact_id": "Your id for the planned contact.", "enrollment_id": "The participant's enrollment_id.",
        "supporter_id": "staff_id of the supporter (optional).",
        "due_datetime": f"Planned date and local time ({TIMEZONE}).", "mode": "Planned mode.",
        "status": "planned, done or dropped.", "void": "1 / yes if the row was entered in error.",
    },
}
_COLUMN_ENUMS: dict[tuple[str, str], tuple[type, str | None]] = {
    ("supporter", "title"): (SupporterTitle, "titles"),
    ("enrollment", "status"): (EnrollmentStatus, None),
    ("goal", "behavior"): (Behavior, "behaviors"),
    ("goal", "target_measure"): (TargetMeasure, None),
    ("goal", "target_comparator"): (Comparator, None),
    ("goal", "lifecycle_status"): (GoalLifecycle, None),
    ("goal", "achievement_status"): (GoalAchievement, None),
    ("goal", "set_by"): (GoalSetBy, None),
    ("contact", "mode"): (ContactMode, "modes"),
    ("contact", "setting"): (ContactSetting, "settings"),
    ("contact", "outcome"): (ContactOutcome, "outcomes"),
    ("contact", "support_types"): (SupportType, "support_types"),
    ("contact", "essential_elements"): (EssentialElement, None),
    ("referral", "need"): (NeedCategory, None),
    ("referral", "status"): (ReferralStatus, None),
    ("planned_contact", "mode"): (ContactMode, "modes"),
    ("planned_contact", "status"): (PlannedStatus, None),
}
_REQUIRED_COLUMNS = {
    "supporter": {"staff_id", "given_name", "family_name", "title"},
    "enrollment": {"enrollment_id", "mrn", "start_date", "supporter_id"},
    "goal": {"goal_id", "enrollment_id", "goal_in_own_words", "behavior", "start_date"},
    "goal_note": {"note_id", "goal_id", "date", "note"},
    "contact": {"contact_id", "enrollment_id", "supporter_id", "contact_datetime", "mode"},
    "referral": {"referral_id", "enrollment_id", "resource_name", "need", "referral_date"},
    "planned_contact": {"planned_contact_id", "enrollment_id", "due_datetime", "mode"},
}


def _format_hint(kind: str, column: str) -> str:
    if column in ("contact_datetime", "due_datetime"):
        return "YYYY-MM-DD HH:MM"
    if column.endswith("date") or column == "date":
        return "YYYY-MM-DD (or MM/DD/YYYY)"
    if column in ("void", "active"):
        return "yes / no (1 / 0)"
    if column in ("duration_minutes",):
        return "whole number"
    if column == "target_value":
        return "number"
    return ""


def write_blank_template(path: Path) -> Path:
    """Write the blank peersync template workbook: an Instructions sheet, then one sheet per record kind with
    its header row only (the column names of mappings/peersync-template/profile.yaml). Code columns get a
    drop-down of the canonical codes that still accepts the other spellings the profile knows (with a warning).
    """
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.worksheet.datavalidation import DataValidation

    try:
        from connector.read.profile import load_profile

        tables = load_profile("peersync-template").code_tables
    except Exception:  # noqa: BLE001 - an installed package without mappings/: canonical codes only
        tables = {}
    bold = Font(bold=True)
    header_fill = PatternFill("solid", fgColor="DDEBF7")
    workbook = Workbook()
    info = workbook.active
    info.title = "Instructions"
    info.append(["peersync template: one sheet per record kind. Fill one row per record; keep the header row."])
    info.append([f"Dates: YYYY-MM-DD. Date-times: YYYY-MM-DD HH:MM in local time ({TIMEZONE}). "
                 "Lists (support_types, essential_elements, goal_ids, conditions): separate with ;"])
    info.append(["Ids are your own (E0001, C000001...): never put an MRN or a name in an id."])
    info.append([])
    info.append(["Sheet", "Column", "Required", "What it holds", "Format", "Allowed codes", "Also accepted"])
    for cell in info[5]:
        cell.font = bold
        cell.fill = header_fill
    for kind in KINDS:
        sheet = workbook.create_sheet(TEMPLATE_SHEETS[kind])
        columns = TEMPLATE_COLUMNS[kind]
        sheet.append(columns)
        for cell in sheet[1]:
            cell.font = bold
            cell.fill = header_fill
        sheet.freeze_panes = "A2"
        for index, column in enumerate(columns, start=1):
            letter = sheet.cell(row=1, column=index).column_letter
            sheet.column_dimensions[letter].width = max(12, len(column) + 4)
            enum, table = _COLUMN_ENUMS.get((kind, column), (None, None))
            codes = [e.value for e in enum] if enum else []
            aliases = [s for spellings in tables.get(table or "", {}).values() for s in spellings]
            if column in ("void", "active"):
                codes = ["yes", "no"]
            info.append([TEMPLATE_SHEETS[kind], column, "yes" if column in _REQUIRED_COLUMNS[kind] else "",
                         COLUMN_HELP[kind][column], _format_hint(kind, column), ", ".join(codes),
                         ", ".join(aliases)])
            if codes and column not in ("support_types", "essential_elements"):
                validation = DataValidation(type="list", formula1='"' + ",".join(codes) + '"', allow_blank=True,
                                            errorStyle="warning", showErrorMessage=True,
                                            error="Not one of the listed codes: peersync may still accept it "
                                                  "(see the Instructions sheet).")
                validation.add(f"{letter}2:{letter}5000")
                sheet.add_data_validation(validation)
    for letter, width in zip("ABCDEFG", (16, 22, 10, 60, 26, 60, 60), strict=True):
        info.column_dimensions[letter].width = width
    for row in info.iter_rows(min_row=6):
        for cell in row:
            cell.alignment = Alignment(wrap_text=True, vertical="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_workbook(workbook, path)
    return path


# -- the committed demo fixtures -------------------------------------------------------------------------------

FIXTURES_CALL = "python -m tests.demogen fixtures fixtures/demo"


def write_demo_fixtures(root: Path) -> dict[str, GenerationSummary]:
    """(Re)write the committed demo: root/template, root/redcap, root/clinic/patients.json and root/README.md,
    all from the default arguments (seed 20260101)."""
    root = Path(root)
    summaries = {
        fmt: generate_program(root / fmt, fmt=fmt, clinic_dir=root / "clinic")  # type: ignore[arg-type]
        for fmt in ("template", "redcap")
    }
    (root / "README.md").write_text(_fixtures_readme(summaries), encoding="utf-8")
    return summaries


def _fixtures_readme(summaries: dict[str, GenerationSummary]) -> str:
    t, r = summaries["template"], summaries["redcap"]
    lines = [
        "# Demo program (synthetic)",
        "",
        "A made-up diabetes peer-support program: every name, MRN, phone number and note is synthetic.",
        "The same program content is written twice, in two source formats, from the same seed:",
        "",
        "- `template/`: peersync's CSV template, read with the `peersync-template` profile"
        " (`mappings/peersync-template/profile.yaml`);",
        "- `redcap/`: a REDCap-style flat export (`PeerSupport_DATA.csv`, repeating instruments, numeric codes,"
        " checkbox columns) and a staff roster (`staff.csv`), read with the `redcap-example` profile"
        " (`mappings/redcap-example/profile.yaml`). Record ids are the enrollment ids; contact, goal, note,"
        " referral and planned-contact ids are composed by the profile (`E0001-c3`, `E0001-g1`...);"
        " `contact_goal_ids` holds full goal ids separated by commas;",
        "- `clinic/patients.json`: the Patients the clinic EHR already has, a FHIR R4 transaction Bundle to load"
        " into the test server before a sync;",
        "- `*/summary.json`: what the generator wrote (counts, bad rows, review cases).",
        "",
        "## How it was generated",
        "",
        "```",
        FIXTURES_CALL,
        "```",
        "",
        "which is, in Python:",
        "",
        "```python",
        "from pathlib import Path",
        "from tests.demogen import generate_program",
        "",
        "root = Path('fixtures/demo')",
        "for fmt in ('template', 'redcap'):",
        "    generate_program(root / fmt, fmt=fmt, clinic_dir=root / 'clinic')  # seed=20260101, 40 participants",
        "```",
        "",
        "(plus this README). Do not edit the files by hand: change `tests/demogen.py` and regenerate;"
        " `tests/unit/test_demo_generator.py` checks that the committed files match the generator."
        " The same program as one Excel workbook: `python -m tests.demogen program OUT --format xlsx`.",
        "",
        f"Program window: {t.start} to {t.as_of} (as-of date), time zone {TIMEZONE}.",
        "",
        "## What is in it",
        "",
        "| kind | rows in the files | accepted by the profile |",
        "| --- | ---: | ---: |",
    ]
    for kind in KINDS:
        lines.append(f"| {kind} | {t.rows[kind]} | {t.counts[kind]} |")
    lines += [
        f"| **total** | {t.total_rows} | {sum(t.counts.values())} |",
        "",
        "The REDCap export has the same rows per kind" + (
            "." if (r.rows, r.counts) == (t.rows, t.counts) else f" except: {r.rows} / {r.counts}."),
        "",
        f"- {t.group_sessions} group sessions ({t.group_contacts} attendee contacts, mode `group`, one"
        " `group_session_id` per session);",
        f"- {t.contacts_fulfilling_plans} contacts fulfil a planned contact (`planned_contact_id`);",
        f"- {t.voided_contacts} voided contacts (`void` = 1: entered in error at the source);",
        "- all six modes, all six settings (some as free text mapped to `other`), all three outcomes, every"
        " support type but `other`, every ADCES7 behaviour; some contacts record essential elements, the others"
        " leave them to the profile's `element_rules`;",
        "- goals with and without measurable targets (HbA1c < 7 %, steps >= 7000 /d, activity >= 150 min/wk,"
        " active days >= 5 d/wk, body weight <= N kg, fasting glucose < 130 mg/dL), in English and Spanish;",
        "- template only: a few date-times with an explicit UTC offset, a few dates written MM/DD/YYYY and a few"
        " codes written with alias spellings from the profile's code tables (`Tel`, `en persona`, `no answer`...).",
        "",
        f"## Deliberate bad rows ({t.expected_rejects} rejected rows per format)",
        "",
        "| format | kind | file | row | record id | problem | field reported |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for name, summary in (("template", t), ("redcap", r)):
        for bad in summary.bad_rows:
            lines.append(f"| {name} | {bad.kind} | {bad.file} | {bad.row} | {bad.record_id} | {bad.problem} |"
                         f" {bad.expected_field} |")
    lines += [
        "",
        "The two rows sharing a contact id are both rejected (neither is sent until the source is fixed).",
        "",
        "## Review cases (clinic matching)",
        "",
        f"- Unknown MRN: enrollment {', '.join(t.unmatched_enrollments) or '-'} has no Patient in"
        " `clinic/patients.json`; the sync must queue it for review.",
        f"- Ambiguous MRN: enrollment {', '.join(t.ambiguous_enrollments) or '-'} has two Patients with its MRN"
        " (`Patient/demo-dup-1` and `Patient/demo-dup-2`, different given names and birth dates); the sync must"
        " queue it for review and match neither.",
        "",
        "Every other Patient is a conditional update on its MRN (`PUT Patient?identifier=<system>%7C<mrn>`, query"
        " value percent-encoded), so the bundle can be loaded again without creating duplicates. The two"
        " Patients that share an MRN are plain client-id updates (`PUT Patient/demo-dup-N`): a conditional update"
        " on an MRN that two Patients share would match both on a second load and fail the whole transaction.",
        "",
    ]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.demogen``: generate a program, the blank template, or the committed fixtures."""
    parser = argparse.ArgumentParser(prog="python -m tests.demogen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("program", help="write a synthetic program into OUT_DIR")
    gen.add_argument("out_dir", type=Path)
    gen.add_argument("--format", dest="fmt", choices=["template", "redcap", "xlsx"], default="template")
    gen.add_argument("--participants", type=int, default=40)
    gen.add_argument("--supporters", type=int, default=6)
    gen.add_argument("--months", type=int, default=6)
    gen.add_argument("--contacts", type=int, default=None, help="exact number of valid contact rows")
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED)
    gen.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START)
    gen.add_argument("--no-bad-rows", dest="bad_rows", action="store_false")
    gen.add_argument("--clinic-dir", type=Path, default=None)
    blank = sub.add_parser("blank-template", help="write the blank template workbook")
    blank.add_argument("path", type=Path, nargs="?", default=Path("mappings/peersync-template/peersync-template.xlsx"))
    fixtures = sub.add_parser("fixtures", help="rewrite the committed demo fixtures")
    fixtures.add_argument("root", type=Path, nargs="?", default=Path("fixtures/demo"))
    args = parser.parse_args(argv)
    if args.command == "program":
        summary = generate_program(args.out_dir, participants=args.participants, supporters=args.supporters,
                                   months=args.months, contacts=args.contacts, seed=args.seed, fmt=args.fmt,
                                   bad_rows=args.bad_rows, start=args.start, clinic_dir=args.clinic_dir)
        print(json.dumps({"rows": summary.rows, "accepted": summary.counts,
                          "expected_rejects": summary.expected_rejects}, indent=2))
    elif args.command == "blank-template":
        print(write_blank_template(args.path))
    else:
        for fmt, summary in write_demo_fixtures(args.root).items():
            print(f"{fmt}: {summary.total_rows} rows, {summary.expected_rejects} expected rejects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
