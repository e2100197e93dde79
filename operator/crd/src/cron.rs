//! Snapshot schedules (`spec.snapshotPolicy.schedule`): the five fields of cron (minute, hour,
//! day of month, month, day of week), in UTC. Each field is `*`, a number, a range `a-b`, a step
//! `*/n` or `a-b/n`, or a comma list of those; day of week 0-7 with 0 and 7 Sunday. As in cron,
//! when both day fields are restricted (neither begins with `*`) a day matching either fires. Names (`MON`, `JAN`) and
//! macros (`@daily`) are not taken: one spelling, checked the same by both tiers.
//!
//! Here rather than a crate: the parsers on crates.io work on chrono's time types, while both
//! tiers keep time in jiff, and the whole grammar is these sixty lines.

use std::str::FromStr;

use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("schedule {0:?} must have five fields: minute hour day-of-month month day-of-week")]
    Fields(String),
    #[error("schedule field {field} {value:?}: {why}")]
    Field { field: &'static str, value: String, why: String },
}

/// A parsed schedule: the allowed values of each field as bit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether the day-of-month and day-of-week fields were `*` (cron's either-day rule).
    any_day: bool,
    any_weekday: bool,
}

/// How far ahead [`Schedule::next_after`] looks: a schedule that fires only on 29 February fires
/// within eight years; one that names 31 February never does.
const HORIZON_DAYS: usize = 8 * 366;

fn field(name: &'static str, text: &str, min: u32, max: u32) -> Result<u64, CronError> {
    let bad = |why: String| CronError::Field { field: name, value: text.to_string(), why };
    let number = |s: &str| -> Result<u32, CronError> {
        let n: u32 = s.parse().map_err(|_| bad(format!("{s:?} is not a number")))?;
        if (min..=max).contains(&n) { Ok(n) } else { Err(bad(format!("{n} is outside {min}-{max}"))) }
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                (r, number(s).ok().filter(|s| *s > 0).ok_or_else(|| bad(format!("bad step {s:?}")))?)
            }
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" => (min, max),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(r)?, max),
                None => (number(r)?, number(r)?),
            },
        };
        if lo > hi {
            return Err(bad(format!("range {lo}-{hi} is backwards")));
        }
        bits |= (lo..=hi).step_by(step as usize).fold(0, |b, n| b | 1 << n);
    }
    Ok(bits)
}

impl FromStr for Schedule {
    type Err = CronError;

    fn from_str(s: &str) -> Result<Self, CronError> {
        let fields: Vec<&str> = s.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(CronError::Fields(s.to_string()));
        };
        let weekdays = field("day-of-week", weekday, 0, 7)?;
        Ok(Schedule {
            minutes: field("minute", minute, 0, 59)?,
            hours: field("hour", hour, 0, 23)?,
            days: field("day-of-month", day, 1, 31)?,
            months: field("month", month, 1, 12)?,
            // 7 is Sunday too.
            weekdays: (weekdays | weekdays >> 7) & 0x7f,
            // Vixie cron's rule: a day field beginning with `*` (`*`, `*/2`) does not restrict.
            any_day: day.starts_with('*'),
            any_weekday: weekday.starts_with('*'),
        })
    }
}

fn has(bits: u64, n: impl Into<i64>) -> bool {
    u32::try_from(n.into()).is_ok_and(|n| n < 64 && bits & (1 << n) != 0)
}

impl Schedule {
    fn fires_on(&self, d: Date) -> bool {
        let day = has(self.days, d.day());
        let weekday = has(self.weekdays, d.weekday().to_sunday_zero_offset());
        let either = match (self.any_day, self.any_weekday) {
            (false, false) => day || weekday,
            _ => day && weekday,
        };
        has(self.months, d.month()) && either
    }

    /// Whether the schedule fires at all (`0 0 31 2 *` never does): looked for from 2000-01-01,
    /// a leap year, so a 29 February schedule counts.
    pub fn ever_fires(&self) -> bool {
        Timestamp::from_second(946_684_800).ok().and_then(|t| self.next_after(t)).is_some()
    }

    /// The first minute strictly after `t` at which the schedule fires (None: it never does).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let utc = TimeZone::UTC;
        let now = utc.to_datetime(t);
        let mut date = now.date();
        // The first candidate minute of the first day: the one after `now`'s.
        let mut from = (now.hour(), now.minute() + 1);
        for _ in 0..HORIZON_DAYS {
            if self.fires_on(date) {
                let at = (from.0..24)
                    .filter(|h| has(self.hours, *h))
                    .flat_map(|h| {
                        let first = if h == from.0 { from.1 } else { 0 };
                        (first..60).filter(|m| has(self.minutes, *m)).map(move |m| (h, m))
                    })
                    .next();
                if let Some((h, m)) = at {
                    let fire = DateTime::from_parts(date, jiff::civil::time(h, m, 0, 0));
                    return utc.to_timestamp(fire).ok();
                }
            }
            date = date.tomorrow().ok()?;
            from = (0, 0);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(schedule: &str, after: &str) -> Option<String> {
        schedule.parse::<Schedule>().unwrap().next_after(at(after)).map(|t| t.to_string())
    }

    #[test]
    fn the_next_fire_is_the_first_matching_minute_strictly_after() {
        assert_eq!(next("0 3 * * *", "2026-12-07T02:59:59Z").as_deref(), Some("2026-12-07T03:00:00Z"));
        assert_eq!(next("0 3 * * *", "2026-12-07T03:00:00Z").as_deref(), Some("2026-12-08T03:00:00Z"));
        assert_eq!(next("* * * * *", "2026-12-07T03:00:30Z").as_deref(), Some("2026-12-07T03:01:00Z"));
        assert_eq!(next("*/15 * * * *", "2026-12-07T03:16:00Z").as_deref(), Some("2026-12-07T03:30:00Z"));
        assert_eq!(next("59 23 31 12 *", "2026-12-31T23:59:00Z").as_deref(), Some("2027-12-31T23:59:00Z"));
        assert_eq!(next("0 0 29 2 *", "2027-03-01T00:00:00Z").as_deref(), Some("2028-02-29T00:00:00Z"));
        assert_eq!(next("0 0 31 2 *", "2027-03-01T00:00:00Z"), None);
    }

    #[test]
    fn days_match_either_field_when_both_are_restricted_and_seven_is_sunday() {
        // 2026-12-07 is a Monday.
        assert_eq!(next("0 12 * * 0", "2026-12-07T00:00:00Z").as_deref(), Some("2026-12-13T12:00:00Z"));
        assert_eq!(next("0 12 * * 7", "2026-12-07T00:00:00Z").as_deref(), Some("2026-12-13T12:00:00Z"));
        assert_eq!(next("0 12 10 * 0", "2026-12-07T00:00:00Z").as_deref(), Some("2026-12-10T12:00:00Z"));
        assert_eq!(next("0 12 * * 1-5", "2026-12-12T13:00:00Z").as_deref(), Some("2026-12-14T12:00:00Z"));
        assert_eq!(next("30 1,13 * 1 *", "2026-12-07T00:00:00Z").as_deref(), Some("2027-01-01T01:30:00Z"));
        // A stepped day field begins with `*`: it does not restrict, so both must match. `*/2`
        // is the odd days: the 7th (a Monday) is past, the 9th no Monday, the 14th not odd.
        assert_eq!(next("0 12 */2 * 1", "2026-12-07T13:00:00Z").as_deref(), Some("2026-12-21T12:00:00Z"));
    }

    #[test]
    fn a_bad_schedule_says_which_field_and_why() {
        let err = |s: &str| s.parse::<Schedule>().unwrap_err().to_string();
        assert!(err("0 3 * *").contains("five fields"));
        assert!(err("60 3 * * *").contains("minute \"60\": 60 is outside 0-59"), "{}", err("60 3 * * *"));
        assert!(err("0 3 0 * *").contains("day-of-month"));
        assert!(err("0 3 * * MON").contains("\"MON\" is not a number"));
        assert!(err("*/0 * * * *").contains("bad step"));
        assert!(err("5-1 * * * *").contains("backwards"));
        assert!(err("@daily").contains("five fields"));
        assert!(!"0 0 31 2 *".parse::<Schedule>().unwrap().ever_fires());
        assert!("0 0 29 2 *".parse::<Schedule>().unwrap().ever_fires());
    }
}
