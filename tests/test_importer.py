"""What the importer will make of a CSV (DESIGN §16): each shape its configs use, each warning, the header check.

Every fixture is built here and goes through the conversion as the daemon's
does (`conversion.convert_files`: normalised CSV, spreadsheets to CSV), then
the check; counts and dates are asserted exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import date, datetime, timedelta

import pytest
from openpyxl.utils import get_column_letter

from esmail import formats
from esmail.conversion import convert_files
from esmail.importer import check
from sheets import xlsx

TIMES = [f"{h:02d}:{m:02d}" for h in range(24) for m in (0, 30)]
VALUES = ",".join(f"{i / 10:g}" for i in range(1, 49))
MPAN, OTHER = "2200013680374", "2200013680375"


def row_per_day(**attributes):
    """The shape of most feeds: MPAN, a name, the date, 48 half hours."""
    return formats.parse({"number_of_header_rows": 1, "header_example": "MPAN,Site,Date," + ",".join(TIMES), "date_format": "%d/%m/%Y",
                          "mpan_mprn_field": "MPAN", "reading_date_field": "Date", "reading_fields": TIMES, **attributes})


def checked(fmt, name: str, data: bytes):
    """The report of the one CSV a file converts to, as the daemon checks it."""
    converted = convert_files([(name, data)], formats={"feed": fmt})
    [report] = converted.checks["feed"].values()
    return report


def csv_of(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


HEADER = "MPAN,Site,Date," + ",".join(TIMES)


def test_row_per_day_with_one_header_row():
    """Two meters over three days, all 48 readings: ok, every count and date as the importer would import them."""
    report = checked(row_per_day(), "export.csv", csv_of(HEADER, f"{MPAN},Ecclesall,01/11/2026,{VALUES}",
                                                         f"{OTHER},Ecclesall,01/11/2026,{VALUES}", f"{MPAN},Ecclesall,03/11/2026,{VALUES}"))
    assert (report.verdict, report.rows, report.filtered, report.valid_rows, report.days, report.meters) == ("ok", 3, 0, 3, 3, 2)
    assert (report.first_date, report.last_date, report.warnings, report.notes) == ("2026-11-01", "2026-11-03", {}, {})
    assert (report.header.row, report.header.moved, report.header.missing, report.header.found[:3]) == (1, [], [], ["MPAN", "Site", "Date"])


def test_the_report_serialises_with_the_field_names_of_the_contract():
    """The JSON of a report: §16's field names, in its order, and `reason` beside the verdict."""
    report = checked(row_per_day(), "export.csv", csv_of(HEADER, f"{MPAN},Ecclesall,01/11/2026,{VALUES}"))
    data = json.loads(report.to_json())
    assert list(data) == ["name", "verdict", "reason", "rows", "filtered", "valid_rows", "days", "meters", "first_date", "last_date",
                          "warnings", "notes", "header", "examples"]
    assert list(data["header"]) == ["row", "expected", "found", "moved", "missing"]
    assert type(report).from_dict(data) == report


def test_a_sep_line_before_the_header_is_two_header_rows_and_its_coming_and_going_is_said():
    """EDF's files: `sep=,` then the header (number_of_header_rows = 2) import; when the line goes, the importer
    skips the first data row (header_row_moved, one row fewer); when it comes to a 1-row feed, the header is read as data."""
    rows = [f"{MPAN},Ecclesall,0{day}/11/2026,{VALUES}" for day in range(1, 4)]
    two = row_per_day(number_of_header_rows=2)
    report = checked(two, "edf.csv", csv_of("sep=,", HEADER, *rows))
    assert (report.verdict, report.rows, report.valid_rows, report.header.row, report.warnings) == ("ok", 3, 3, 2, {})
    gone = checked(two, "edf.csv", csv_of(HEADER, *rows))
    assert (gone.verdict, gone.rows, gone.valid_rows, gone.first_date, gone.header.row) == ("warnings", 2, 2, "2026-11-02", 1)
    assert gone.warnings == {"header_row_moved": 1} and gone.examples[0].line == 1 and gone.examples[0].warnings == ["header_row_moved"]
    came = checked(row_per_day(), "edf.csv", csv_of("sep=,", HEADER, *rows))
    assert (came.verdict, came.rows, came.valid_rows, came.header.row) == ("warnings", 4, 3, 2)
    assert came.warnings == {"invalid_non_numeric_mpan_mprn": 1, "invalid_reading_date": 1, "header_row_moved": 1}
    assert came.examples[0].line == 2 and came.examples[0].warnings == ["header_row_moved", "invalid_non_numeric_mpan_mprn", "invalid_reading_date"]


def test_title_rows_and_a_grand_total_row_are_left_out():
    """Five title rows skipped with the header (number_of_header_rows = 6), a `Grand Total` row removed by
    column_row_filters: filtered, not a warning."""
    fmt = row_per_day(number_of_header_rows=6, column_row_filters={"MPAN": "^Grand Total$"})
    titles = ["Half hourly consumption", "Customer: Sheffield City Council", "Period: November 2026", "Units: kWh", "Generated 2026-12-01"]
    total = ",".join(str(10 * i) for i in range(48))
    report = checked(fmt, "report.csv", csv_of(*titles, HEADER, f"{MPAN},Ecclesall,01/11/2026,{VALUES}",
                                               f"{OTHER},Totley,01/11/2026,{VALUES}", f"Grand Total,,,{total}"))
    assert (report.verdict, report.rows, report.filtered, report.valid_rows, report.meters) == ("ok", 2, 1, 2, 2)
    assert report.header.row == 6 and report.warnings == {}


def test_units_rows_are_filtered_by_expected_units():
    """A units column: only rows whose units are expected_units import; the kVArh rows are filtered."""
    header = "MPAN,Date,Units," + ",".join(TIMES)
    fmt = row_per_day(header_example=header, units_field="Units", expected_units="kWh")
    report = checked(fmt, "units.csv", csv_of(header, f"{MPAN},01/11/2026,kWh,{VALUES}", f"{MPAN},01/11/2026,kVArh,{VALUES}",
                                              f"{MPAN},02/11/2026,kWh,{VALUES}", f"{MPAN},02/11/2026,kVArh,{VALUES}"))
    assert (report.verdict, report.rows, report.filtered, report.valid_rows, report.days) == ("ok", 2, 2, 2, 2)
    assert (report.first_date, report.last_date) == ("2026-11-01", "2026-11-02")


def per_reading(**attributes):
    return formats.parse({"row_per_reading": True, "number_of_header_rows": 1, "date_format": "%d/%m/%Y", "mpan_mprn_field": "MPRN",
                          "reading_date_field": "Date", "reading_fields": ["KWH"], **attributes})


def test_row_per_reading_with_a_period_column():
    """Periods 1-48 fill a meter-day; a day missing two half hours (over the default limit of 1) does not import:
    one missing_readings for it; dates are the meter-days'."""
    fmt = per_reading(positional_index=True, period_field="Period", header_example="MPRN,Date,Period,KWH")
    rows = [f"123456789,01/11/2026,{p},1.{p}" for p in range(1, 49)] + [f"123456789,02/11/2026,{p},1" for p in range(1, 47)]
    rows += [f"987654321,02/11/2026,{p},2" for p in range(2, 49)]  # one half hour short: within the limit
    report = checked(fmt, "periods.csv", csv_of("MPRN,Date,Period,KWH", *rows))
    assert (report.verdict, report.rows, report.valid_rows, report.days, report.meters) == ("warnings", 141, 95, 2, 2)
    assert (report.first_date, report.last_date, report.warnings) == ("2026-11-01", "2026-11-02", {"missing_readings": 1})
    assert [(e.line, e.warnings) for e in report.examples] == [(50, ["missing_readings"])]


def test_row_per_reading_with_a_time_column_in_both_forms():
    """A time column as `01:30` one day and `130` (and `0`, `30`) the next: 96 readings, two whole days."""
    fmt = per_reading(positional_index=True, reading_time_field="Time", header_example="MPRN,Date,Time,KWH")
    rows = [f"123456789,01/11/2026,{t},1" for t in TIMES] + [f"123456789,02/11/2026,{int(t.replace(':', ''))},1" for t in TIMES]
    report = checked(fmt, "times.csv", csv_of("MPRN,Date,Time,KWH", *rows))
    assert (report.verdict, report.rows, report.valid_rows, report.days, report.first_date, report.last_date) == (
        "ok", 96, 96, 2, "2026-11-01", "2026-11-02")
    broken = checked(fmt, "times.csv", csv_of("MPRN,Date,Time,KWH", *rows, "123456789,03/11/2026,24:00,1"))
    assert broken.verdict == "rejected" and broken.rows == 97 and broken.valid_rows == 0
    assert broken.reason.startswith("the importer stops at line 98: '24:00' is not a time it reads")


def test_row_per_reading_with_end_labelled_timestamps():
    """`%e %b %Y %H:%M:%S` labelled at the end of the half hour, after a `sep=,` line: 00:30 is the day's first
    reading and 00:00 the previous day's last; a meter-day one reading short of 48 imports (limit 1)."""
    fmt = per_reading(number_of_header_rows=2, date_format="%e %b %Y %H:%M:%S", mpan_mprn_field="MPR", reading_date_field="ReadDatetime",
                      reading_fields=["kWh"], header_example="MPR,ReadDatetime,kWh,ReadType", half_hourly_labelling="end")
    start = datetime(2026, 11, 1)
    rows = []
    for i in range(1, 97):  # 1 Nov 00:30 … 3 Nov 00:00: two whole days
        at = start + timedelta(minutes=30 * i)
        if i != 60:  # 2 Nov 06:00 missing: one blank half hour
            rows.append(f"1710035168313,{at.day:2d} {at:%b %Y %H:%M:%S},{i},Actual")
    report = checked(fmt, "edf.csv", csv_of("sep=,", "MPR,ReadDatetime,kWh,ReadType", *rows))
    assert rows[0].startswith("1710035168313, 1 Nov 2026 00:30:00") and rows[47].endswith(",Actual") and " 2 Nov 2026 00:00:00" in rows[47]
    assert (report.verdict, report.rows, report.valid_rows, report.days, report.meters) == ("ok", 95, 95, 2, 1)
    assert (report.first_date, report.last_date, report.notes) == ("2026-11-01", "2026-11-02", {})


def test_lookup_by_serial_number_counts_serials_as_meters():
    """lookup_by_serial_number: the serial column names the meter (letters allowed); a blank serial is missing_mpan_mprn."""
    fmt = row_per_day(header_example="Site Id,Meter Number,Reading Date," + ",".join(TIMES), mpan_mprn_field="", msn_field="Meter Number",
                      lookup_by_serial_number=True, reading_date_field="Reading Date", date_format="%d/%m/%y")
    report = checked(fmt, "serials.csv", csv_of("Site Id,Meter Number,Reading Date," + ",".join(TIMES),
                                                f"10545307,K0229111D6,12/11/18,{VALUES}", f"10545307,K0229111D7,12/11/18,{VALUES}",
                                                f"10545308,,13/11/18,{VALUES}"))
    assert (report.verdict, report.rows, report.valid_rows, report.meters, report.first_date) == ("warnings", 3, 2, 2, "2018-11-12")
    assert report.warnings == {"missing_mpan_mprn": 1}


def test_each_warning_of_the_importer_on_the_row_that_has_it():
    """One row per cause, each named as the importer names it; a blank MPAN is not also non-numeric; the earlier of
    two rows for one meter and day is the duplicate (the last wins); an identical repeat is merged, not a duplicate."""
    future = (date.today() + timedelta(days=40)).strftime("%d/%m/%Y")
    short = ",".join(["1"] * 47) + ","
    dashed = ",".join(["1"] * 47) + ",-"
    report = checked(row_per_day(), "warnings.csv", csv_of(
        HEADER,
        f"{MPAN},a,01/11/2026,{VALUES}",             # 2: imports
        f"{MPAN},a,02/11/2026,{short}",              # 3: missing_readings (a blank)
        f"{MPAN},a,03/11/2026,{dashed}",             # 4: missing_readings (a dash)
        f",a,04/11/2026,{VALUES}",                   # 5: missing_mpan_mprn
        f"1.23405E+12,a,05/11/2026,{VALUES}",        # 6: invalid_non_numeric_mpan_mprn (Excel's MPAN)
        f"{MPAN},a,,{VALUES}",                       # 7: missing_reading_date
        f"{MPAN},a,31/02/2026,{VALUES}",             # 8: invalid_reading_date
        f"{MPAN},a,{future},{VALUES}",               # 9: future_reading_date
        f"{MPAN},a,06/11/2026,{VALUES}",             # 10: duplicate_reading (line 11 is later)
        f"{MPAN},a,06/11/2026,{VALUES.replace('0.1', '9', 1)}",  # 11: imports
        f"{OTHER},a,07/11/2026,{VALUES}",            # 12: imports
        f"{OTHER},a,07/11/2026,{VALUES}",            # 13: the same row again: merged
    ))
    assert report.warnings == {"missing_readings": 2, "missing_mpan_mprn": 1, "invalid_non_numeric_mpan_mprn": 1,
                               "missing_reading_date": 1, "invalid_reading_date": 1, "future_reading_date": 1, "duplicate_reading": 1}
    assert [(e.line, e.warnings) for e in report.examples] == [
        (3, ["missing_readings"]), (4, ["missing_readings"]), (5, ["missing_mpan_mprn"]), (6, ["invalid_non_numeric_mpan_mprn"]),
        (7, ["missing_reading_date"]), (8, ["invalid_reading_date"]), (9, ["future_reading_date"]), (10, ["duplicate_reading"])]
    assert report.examples[4].text == f"{MPAN},a,,{VALUES}"
    assert (report.verdict, report.rows, report.valid_rows, report.days, report.meters) == ("warnings", 12, 4, 3, 2)
    assert (report.first_date, report.last_date) == ("2026-11-01", "2026-11-07")


def test_a_column_inserted_in_the_middle_is_a_header_change_naming_the_moved_columns():
    """A supplier adds `Region` before the date: the importer would read every reading one column off, silently;
    the report says header changed and names the date and the 48 readings as moved."""
    changed = "MPAN,Site,Region,Date," + ",".join(TIMES)
    report = checked(row_per_day(), "export.csv", csv_of(changed, f"{MPAN},a,North,01/11/2026,{VALUES}"))
    assert report.verdict == "header changed" and report.header.row == 1 and report.header.missing == []
    assert report.header.moved[:2] == [{"name": "Date", "expected": 3, "found": 4}, {"name": "00:00", "expected": 4, "found": 5}]
    assert len(report.header.moved) == 49 and report.notes == {"columns_added": 1}
    assert report.header_changes().startswith("Date moved from column 3 to 4; 00:00 moved from column 4 to 5")
    renamed = checked(row_per_day(), "export.csv", csv_of(HEADER.replace("MPAN", "Meter Point"), f"{MPAN},a,01/11/2026,{VALUES}"))
    assert (renamed.verdict, renamed.header.missing, renamed.header.moved, renamed.valid_rows) == ("header changed", ["MPAN"], [], 1)
    cosmetic = checked(row_per_day(), "export.csv", csv_of(HEADER.replace("Site", "School"), f"{MPAN},a,01/11/2026,{VALUES}"))
    assert (cosmetic.verdict, cosmetic.notes) == ("ok", {"unread_columns_renamed": 1})


def test_the_header_on_another_row_than_configured_is_a_warning():
    """A title line pushes the header to row 2 of a 1-header-row feed: header_row_moved, and the header is read as data."""
    report = checked(row_per_day(), "export.csv", csv_of("Export of 01/11/2026,,,", HEADER, f"{MPAN},a,01/11/2026,{VALUES}"))
    assert (report.verdict, report.header.row, report.rows, report.valid_rows) == ("warnings", 2, 2, 1)
    assert report.warnings["header_row_moved"] == 1 and report.examples[0].line == 2


def test_iso_dates_in_a_day_first_feed_are_a_note():
    """`%d/%m/%Y` configured, `2026-11-01` sent: the importer's Date.parse fallback reads it: a note, not a warning."""
    report = checked(row_per_day(), "iso.csv", csv_of(HEADER, f"{MPAN},a,2026-11-01,{VALUES}", f"{MPAN},a,2026-11-02T00:00:00Z,{VALUES}",
                                                      f"{MPAN},a,03/11/2026,{VALUES}", f"{MPAN},a,4 Nov 2026,{VALUES}"))
    assert (report.verdict, report.valid_rows, report.notes, report.warnings) == ("ok", 4, {"date_format_differs": 3}, {})
    assert (report.first_date, report.last_date) == ("2026-11-01", "2026-11-04")


def test_an_xlsx_with_date_cells_is_a_note_not_a_warning():
    """A spreadsheet's date cells come out as ISO (`2026-11-01`), which a `%d/%m/%Y` feed imports all the same."""
    cells = {"A1": "MPAN", "B1": "Site", "C1": "Date"}
    cells.update({f"{get_column_letter(4 + i)}1": t for i, t in enumerate(TIMES)})
    for r, day in enumerate((1, 2), 2):
        cells.update({f"A{r}": int(MPAN), f"B{r}": "Ecclesall", f"C{r}": datetime(2026, 11, day)})
        cells.update({f"{get_column_letter(4 + i)}{r}": (i + 1) / 10 for i in range(48)})
    data = xlsx(cells, formats={"C2": "dd/mm/yyyy", "C3": "dd/mm/yyyy"})
    report = checked(row_per_day(), "readings.xlsx", data)
    assert report.name == "readings.xlsx.csv"
    assert (report.verdict, report.valid_rows, report.meters, report.notes, report.warnings) == ("ok", 2, 1, {"date_format_differs": 2}, {})
    assert (report.first_date, report.last_date) == ("2026-11-01", "2026-11-02")



def test_a_file_of_only_a_header_is_rejected():
    """No data rows: the importer's own words, "No valid readings in file"; too few rows for the header rows: its other ones."""
    report = checked(row_per_day(), "empty.csv", csv_of(HEADER))
    assert (report.verdict, report.reason, report.rows, report.header.row) == ("rejected", "No valid readings in file", 0, 1)
    short = checked(row_per_day(number_of_header_rows=2), "empty.csv", csv_of(HEADER))
    assert (short.verdict, short.reason) == ("rejected", "Expected 2 header rows but file has only 1.")


def test_what_rubys_csv_refuses_is_rejected_with_its_message():
    """A stray quote inside a field: Ruby's CSV raises (the importer cannot parse the file); Python's would read on."""
    report = checked(row_per_day(), "bad.csv", csv_of(HEADER, f'{MPAN},St "Mary,01/11/2026,{VALUES}'))
    assert (report.verdict, report.reason) == ("rejected", "Unable to parse the file (Illegal quoting in line 2.)")
    quoted = checked(row_per_day(), "quoted.csv", csv_of(HEADER, f'"{MPAN}","St ""Mary"", Ecclesall","01/11/2026",{VALUES}'))
    assert (quoted.verdict, quoted.valid_rows) == ("ok", 1)


def test_ruby_strptime_reads_as_ruby_does():
    """%e takes a space and a digit, %Y every digit (so `12/11/18` in a `%d/%m/%Y` feed is the year 18, as the
    importer imports it), %y is 1969-2068; a date %d/%m/%Y does not read falls back to Date.parse's forms only."""
    from esmail.rubydate import parse, strptime

    today = date(2026, 12, 1)
    assert strptime("%e %b %Y %H:%M:%S").date(" 1 Aug 2019 00:30:00", today) == date(2019, 8, 1)
    assert strptime("%d/%m/%Y").date("12/11/18", today) == date(18, 11, 12)
    assert strptime("%d/%m/%y").date("12/11/69", today) == date(1969, 11, 12)
    assert strptime("%Y%m%d").date("20261130", today) == date(2026, 11, 30)
    assert strptime("%d/%m/%Y").date("31/02/2026", today) is None
    for text in ("2026-11-30", "2026-11-30T00:30:00Z", "20261130", "30 Nov 2026", "30-Nov-2026", "Nov 30 2026", "30/11/2026", "30.11.2026"):
        assert parse(text, today).day == date(2026, 11, 30), text
    assert parse("12/11/18", today) is None and parse("AAAAA", today) is None


@pytest.mark.parametrize("attributes, key, words", [
    ({"date_format": "%d/%m/%Q"}, "date_format", "%Q, which the importer's Ruby strptime does not read"),
    ({"date_format": "%-d/%m/%Y"}, "date_format", "no flags such as '-'"),
    ({"reading_fields": TIMES[:47]}, "reading_fields", "has 47 names; a row-per-day format needs 48"),
    ({"reading_fields": TIMES[:47] + ["HH8"]}, "reading_fields[47]", "'HH8' is not a column of header_example"),
    ({"reading_date_field": "Day"}, "reading_date_field", "'Day' is not a column of header_example"),
    ({"column_row_filters": {"Total": "x"}}, "column_row_filters['Total']", "'Total' is not a column of header_example"),
    ({"column_row_filters": {"MPAN": "("}}, "column_row_filters", "is not a regular expression"),
    ({"half_hourly_labelling": "middle"}, "half_hourly_labelling", 'must be "start" or "end"'),
    ({"positional_index": True}, "positional_index", "needs row_per_reading = true"),
    ({"date_fromat": "%d/%m/%Y"}, "date_fromat", "is not an attribute of the importer's AmrDataFeedConfig"),
])
def test_a_format_that_cannot_be_checked_names_the_attribute_and_the_fix(attributes, key, words):
    """Each fault of an inline format: FormatError naming the attribute, what is wrong, and what to do."""
    with pytest.raises(formats.FormatError) as caught:
        row_per_day(**attributes)
    assert caught.value.key == key and words in str(caught.value)


RAILS = {  # one AmrDataFeedConfig as Rails' to_json writes it: every column, nulls included
    "id": 7, "description": "EDF Energy", "identifier": "edf", "date_format": "%d/%m/%Y", "mpan_mprn_field": "MPAN",
    "reading_date_field": "Date", "reading_fields": TIMES, "msn_field": None, "header_example": HEADER, "number_of_header_rows": 1,
    "created_at": "2019-03-01T10:11:12.000Z", "updated_at": "2025-09-30T08:00:00.000Z", "process_type": "s3_folder",
    "source_type": "email", "handle_off_by_one": False, "row_per_reading": False, "column_separator": ",", "units_field": None,
    "expected_units": None, "column_row_filters": {}, "positional_index": False, "period_field": None, "reading_time_field": None,
    "half_hourly_labelling": None, "lookup_by_serial_number": False, "missing_readings_limit": None, "allow_merging": False,
    "convert_to_kwh": "no", "delayed_reading": False, "enabled": True, "estimate_flags": [], "missing_reading_window": 5,
    "owned_by_id": None, "reading_status_fields": [], "repeated_names": False,
}


def test_the_json_export_with_rails_attributes(tmp_path):
    """The importer's export: extra attributes and nulls ignored; an entry that cannot be checked is Unusable with its
    reason (and a warning); an API feed is no format; a disabled one still is (the importer still imports its files)."""
    export = tmp_path / "feed-formats.json"
    export.write_text(json.dumps([
        RAILS,
        {**RAILS, "id": 8, "identifier": "legacy", "description": "Legacy", "reading_fields": TIMES[:47] + ["HH8"]},
        {**RAILS, "id": 9, "identifier": "n3rgy", "process_type": "n3rgy_api", "header_example": None},
        {**RAILS, "id": 10, "identifier": "paused", "enabled": False},
    ]))
    found, warnings = formats.load_export(export)
    assert set(found) == {"edf", "legacy", "paused"} and found["edf"] == row_per_day() and found["paused"] == row_per_day()
    assert found["legacy"] == formats.Unusable("reading_fields[47]: 'HH8' is not a column of header_example (MPAN, Site, Date, 00:00, "
                                               "00:30, 01:00, …); name one of its columns, or fix header_example to match the files")
    assert warnings == [f"identifier 'legacy': {found['legacy'].reason}; its files get the verdict \"format unusable\""]
    report = checked(found["legacy"], "export.csv", csv_of(HEADER))
    assert (report.verdict, report.reason) == ("format unusable", found["legacy"].reason)
    for bad, words in (("[1,", "is not JSON"), ('{"identifier": "edf"}', "must be a JSON array of objects")):
        export.write_text(bad)
        with pytest.raises(ValueError, match=words):
            formats.load_export(export)


def test_asdict_of_a_report_is_what_the_json_says():
    """`esmail check --json` prints asdict; the history keeps to_json: the same fields."""
    report = checked(row_per_day(), "export.csv", csv_of(HEADER, f",a,01/11/2026,{VALUES}"))
    assert json.loads(report.to_json()) == json.loads(json.dumps(asdict(report)))
    assert report.examples[0].warnings == ["missing_mpan_mprn"] and report.verdict == "rejected"


FORMATS = [
    row_per_day(),
    row_per_day(number_of_header_rows=0, column_row_filters={"Site": "^Total"}, missing_readings_limit=2, allow_merging=True),
    row_per_day(header_example="Site Id,Meter Number,Reading Date,Units," + ",".join(TIMES), mpan_mprn_field="", msn_field="Meter Number",
                lookup_by_serial_number=True, reading_date_field="Reading Date", units_field="Units", expected_units="kWh", date_format="%d-%b-%y"),
    per_reading(positional_index=True, period_field="Period", header_example="MPRN,Date,Period,KWH"),
    per_reading(positional_index=True, reading_time_field="Time", header_example="MPRN,Date,Time,KWH", column_separator=";"),
    per_reading(number_of_header_rows=2, date_format="%e %b %Y %H:%M:%S", header_example="MPRN,Date,KWH,Type"),
    per_reading(half_hourly_labelling="start", date_format="%Y-%m-%dT%H:%M", header_example="MPRN,Date,KWH", allow_merging=True),
]


def test_any_text_gets_a_report_and_never_an_error():
    """Whatever a file holds (quotes, separators, dates, numbers, blank fields in any order), every shape of format
    gives a report whose counts add up, and that survives its own JSON."""
    from hypothesis import given, settings, strategies as st

    cell = st.one_of(st.sampled_from(["", "-", " ", '"', '""', "Total", "MPAN", "Date", "01/11/2026", "2026-11-01T00:30", "1 Nov 26",
                                      "31/02/2026", "24:00", "130", "48", "0", "2200013680374", "1.23405E+12", "kWh", "1.5"]),
                     st.text(alphabet=',;"0123456789:/- TZabc\n', max_size=12))
    rows = st.lists(st.lists(cell, max_size=55).map(",".join), max_size=12).map("\n".join)

    @settings(max_examples=int(__import__("os").environ.get("ESMAIL_FUZZ_EXAMPLES", "200")), deadline=None)
    @given(rows, st.sampled_from(range(len(FORMATS))))
    def run(text, which):
        data = text.encode()
        report = check("fuzz.csv", data, FORMATS[which])
        assert report.verdict in ("ok", "warnings", "rejected", "header changed")
        assert 0 <= report.valid_rows <= report.rows and report.days <= max(report.valid_rows, 0) + report.rows
        assert type(report).from_dict(json.loads(report.to_json())) == report

    run()


def test_a_quoted_line_read_the_quick_way_gives_the_fields_rubys_rules_give():
    """The usual quoted line (quotes only in its first fields) is read by one match; any line, read so, gives the
    fields the strict reading gives, and a line the strict reading refuses is never read the quick way."""
    from hypothesis import given, settings, strategies as st

    from esmail.importer import Malformed, _Reader

    field = st.one_of(st.text(alphabet='ab,"; ', max_size=6), st.text(alphabet="ab, ", max_size=4).map(lambda t: f'"{t}"'))
    line = st.lists(field, min_size=1, max_size=7).map(",".join)

    @settings(max_examples=int(__import__("os").environ.get("ESMAIL_FUZZ_EXAMPLES", "200")) * 5, deadline=None)
    @given(line, st.integers(min_value=1, max_value=4))
    def run(text, depth):
        quick, strict = _Reader([text], ",", depth, 0), _Reader([text], ",", depth, 0)
        strict._head = __import__("re").compile("(?!)")  # never matches: the strict reading alone
        try:
            expected = strict.row(0)
        except Malformed:
            expected = None
        try:
            found = quick.row(0)
        except Malformed:
            found = None
        assert found == expected, (text, depth)

    run()
